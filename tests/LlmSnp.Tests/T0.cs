public class T0 { [Fact] public void A() {} }
