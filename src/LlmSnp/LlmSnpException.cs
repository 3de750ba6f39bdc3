namespace LlmSnp;

/// <summary>
/// A user-facing failure: the message is one line that names the file, tensor or field at fault.
/// The CLI prints it without a stack trace and exits non-zero.
/// </summary>
public sealed class LlmSnpException : Exception
{
    public LlmSnpException(string message) : base(message) { }
    public LlmSnpException(string message, Exception inner) : base(message, inner) { }
}
