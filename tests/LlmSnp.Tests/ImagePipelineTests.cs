using System.Text.Json;
using LlmSnp.Data.Images;

namespace LlmSnp.Tests;

/// <summary>
/// Image preprocessing against Pillow: goldens in tests/fixtures/images were written by
/// tools/reference/pil_preprocess.py (Pillow 9.4.0 from Debian 12, libjpeg-turbo 6.2 ABI).
/// </summary>
public class ImagePipelineTests
{
    static string ImageFixture(string name) => Repo.Fixture(Path.Combine("images", name));
    const string Png = "synthetic-37x23.png";
    const string Jpeg = "ILSVRC2012_val_00046087.JPEG";

    static readonly Lazy<JsonDocument> PngGold = new(() => JsonDocument.Parse(File.ReadAllText(ImageFixture("synthetic-37x23.pil.json"))));
    static readonly Lazy<JsonDocument> JpegGold = new(() => JsonDocument.Parse(File.ReadAllText(ImageFixture("ILSVRC2012_val_00046087.pil.json"))));

    static RgbImage FromJson(JsonElement e) =>
        new(e.GetProperty("width").GetInt32(), e.GetProperty("height").GetInt32(),
            e.GetProperty("pixels").EnumerateArray().Select(x => (byte)x.GetInt32()).ToArray());

    static RgbImage Source => FromJson(PngGold.Value.RootElement.GetProperty("source"));

    static PreprocessConfig Cfg(int shortestEdge, int crop, float[]? mean = null, float[]? std = null) =>
        new(true, shortestEdge, null, null, true, crop, crop, true, 1.0 / 255.0, true,
            mean ?? [0.5f, 0.5f, 0.5f], std ?? [0.5f, 0.5f, 0.5f]);

    static void AssertSameBytes(byte[] expected, byte[] actual, int width, string what)
    {
        Assert.Equal(expected.Length, actual.Length);
        for (int i = 0; i < expected.Length; i++)
            if (expected[i] != actual[i])
                Assert.Fail($"{what}: first difference at pixel (y={i / 3 / width}, x={i / 3 % width}) channel {i % 3}: Pillow {expected[i]}, ours {actual[i]}");
    }

    [Fact]
    public void Png_decodes_to_the_exact_pixels_pillow_reads()
    {
        var img = ImageDecoder.Decode(ImageFixture(Png));
        var gold = Source;
        Assert.Equal((37, 23), (img.Width, img.Height));
        AssertSameBytes(gold.Pixels, img.Pixels, img.Width, "decode");
    }

    public static TheoryData<int, int> ResizeSizes() => new() { { 16, 10 }, { 53, 31 }, { 50, 12 }, { 37, 9 }, { 11, 23 }, { 1, 1 } };

    [Theory]
    [MemberData(nameof(ResizeSizes))]
    public void Bicubic_resize_is_bit_exact_with_pillow(int width, int height)
    {
        var gold = PngGold.Value.RootElement.GetProperty("resize").EnumerateArray()
            .Select(FromJson).Single(g => g.Width == width && g.Height == height);
        var ours = PilResize.Bicubic(Source, width, height);
        Assert.Equal((width, height), (ours.Width, ours.Height));
        AssertSameBytes(gold.Pixels, ours.Pixels, width, $"37x23 -> {width}x{height}");
    }

    [Fact]
    public void Bicubic_resize_to_the_same_size_returns_the_same_pixels_in_a_copy()
    {
        var src = Source;
        var gold = PngGold.Value.RootElement.GetProperty("resize").EnumerateArray().Select(FromJson).Single(g => g.Width == 37 && g.Height == 23);
        var ours = PilResize.Bicubic(src, 37, 23);
        AssertSameBytes(src.Pixels, ours.Pixels, 37, "identity");
        AssertSameBytes(gold.Pixels, ours.Pixels, 37, "identity vs Pillow");
        Assert.NotSame(src.Pixels, ours.Pixels);
    }

    [Fact]
    public void Bicubic_resize_of_a_flat_image_keeps_its_colour()
    {
        var px = new byte[9 * 7 * 3];
        for (int i = 0; i < px.Length; i += 3) { px[i] = 200; px[i + 1] = 0; px[i + 2] = 255; }
        var r = PilResize.Bicubic(new RgbImage(9, 7, px), 4, 13);
        for (int i = 0; i < r.Pixels.Length; i += 3) Assert.Equal((200, 0, 255), (r.Pixels[i], r.Pixels[i + 1], r.Pixels[i + 2]));
    }

    [Theory]
    [InlineData("vit_se20_crop16")]
    [InlineData("imagenet_se21_crop18")]
    public void Preprocess_matches_pillow_reference(string name)
    {
        var g = PngGold.Value.RootElement.GetProperty("preprocess").EnumerateArray().Single(e => e.GetProperty("name").GetString() == name);
        float[] F(string k) => g.GetProperty(k).EnumerateArray().Select(x => x.GetSingle()).ToArray();
        int crop = g.GetProperty("crop")[0].GetInt32();
        var cfg = Cfg(g.GetProperty("shortest_edge").GetInt32(), crop, F("mean"), F("std"));
        var ours = ImagePreprocessor.ToChw(Source, cfg);
        var gold = F("chw");
        Assert.Equal(3 * crop * crop, gold.Length);
        Assert.Equal(gold.Length, ours.Length);
        for (int i = 0; i < gold.Length; i++)
            Assert.True(Math.Abs(gold[i] - ours[i]) <= 1e-6f,
                $"{name}: CHW index {i} (c={i / (crop * crop)}, y={i / crop % crop}, x={i % crop}): Pillow {gold[i]}, ours {ours[i]}");
    }

    [Fact]
    public void Preprocess_of_a_tiny_image_matches_hand_computed_values()
    {
        // 2x2, rows: [(0,128,255) (10,20,30)] / [(255,0,1) (64,192,100)]
        byte[] px = [0, 128, 255, 10, 20, 30, 255, 0, 1, 64, 192, 100];
        var cfg = Cfg(shortestEdge: 2, crop: 2);
        var chw = ImagePreprocessor.ToChw(new RgbImage(2, 2, px), cfg);
        byte[] planar = [0, 10, 255, 64, 128, 20, 0, 192, 255, 30, 1, 100];   // CHW order
        Assert.Equal(12, chw.Length);
        for (int i = 0; i < 12; i++)
            Assert.Equal((planar[i] / 255.0 - 0.5) / 0.5, chw[i], 1e-6);
        Assert.Equal(-1f, chw[0]);
        Assert.Equal(1f, chw[2]);

        // No rescale or normalize: raw byte values.
        var raw = ImagePreprocessor.ToChw(new RgbImage(2, 2, px), cfg with { DoRescale = false, DoNormalize = false });
        Assert.Equal(planar.Select(b => (float)b), raw);
    }

    [Theory]
    [InlineData(20, 16, 2)]   // even difference
    [InlineData(21, 18, 2)]   // 1.5 rounds to 2 (HF's floor division would give 1)
    [InlineData(33, 18, 8)]   // 7.5 rounds to 8
    [InlineData(21, 16, 2)]   // 2.5 rounds half to even: 2
    [InlineData(31, 16, 8)]   // 7.5 -> 8
    [InlineData(7, 6, 0)]     // 0.5 -> 0
    [InlineData(248, 224, 12)]
    [InlineData(330, 224, 53)]
    [InlineData(2, 4, -1)]    // crop larger: torchvision pads (4 - 2) // 2 on the leading side
    [InlineData(2, 5, -1)]
    public void Center_crop_offset_follows_torchvision(int size, int crop, int expected) =>
        Assert.Equal(expected, ImagePreprocessor.CropOffset(size, crop));

    [Fact]
    public void Center_crop_takes_the_rounded_offset_window_and_pads_with_zero()
    {
        // 7 wide x 5 high, pixel value = 10*y + x in every channel; crop 2 high x 4 wide:
        // top = round(1.5) = 2, left = round(1.5) = 2.
        var px = new byte[7 * 5 * 3];
        for (int y = 0; y < 5; y++) for (int x = 0; x < 7; x++) for (int c = 0; c < 3; c++) px[(y * 7 + x) * 3 + c] = (byte)(10 * y + x);
        var img = new RgbImage(7, 5, px);
        var cfg = new PreprocessConfig(false, null, null, null, true, 2, 4, false, 1, false, [0f, 0f, 0f], [1f, 1f, 1f]);
        var chw = ImagePreprocessor.ToChw(img, cfg);
        float[] plane = [22, 23, 24, 25, 32, 33, 34, 35];
        Assert.Equal(plane.Concat(plane).Concat(plane), chw);

        // Crop 7 high x 9 wide of the 5-high, 7-wide image: torchvision pads (7-5)//2 = 1 row and (9-7)//2 = 1 column in front.
        var big = ImagePreprocessor.ToChw(img, cfg with { CropHeight = 7, CropWidth = 9 });
        Assert.Equal(3 * 7 * 9, big.Length);
        Assert.Equal(0f, big[0]);                 // (0,0) padding
        Assert.Equal(0f, big[1 * 9 + 0]);         // (1,0) left padding
        Assert.Equal(0f, big[1 * 9 + 1]);         // (1,1) = source (0,0) whose value is 0 too
        Assert.Equal(11f, big[2 * 9 + 2]);        // (2,2) = source (1,1)
        Assert.Equal(46f, big[5 * 9 + 7]);        // (5,7) = source (4,6)
        Assert.Equal(0f, big[6 * 9 + 7]);         // bottom padding row
    }

    [Theory]
    [InlineData(37, 23, 20, 32, 20)]
    [InlineData(23, 37, 20, 20, 32)]
    [InlineData(500, 375, 248, 330, 248)]   // 330.67 truncates
    [InlineData(375, 500, 248, 248, 330)]
    [InlineData(227, 227, 248, 248, 248)]
    [InlineData(1001, 3, 224, 74741, 224)]
    public void Shortest_edge_resize_truncates_the_long_side(int w, int h, int n, int ew, int eh) =>
        Assert.Equal((ew, eh), ImagePreprocessor.ResizedSize(w, h, Cfg(n, 1)));

    [Fact]
    public void Jpeg_decode_is_within_two_levels_of_pillow()
    {
        var d = JpegGold.Value.RootElement.GetProperty("decode");
        var img = ImageDecoder.Decode(ImageFixture(Jpeg));
        Assert.Equal((d.GetProperty("width").GetInt32(), d.GetProperty("height").GetInt32()), (img.Width, img.Height));
        foreach (var p in d.GetProperty("pixels_at").EnumerateArray())
        {
            int y = p[0].GetInt32(), x = p[1].GetInt32();
            for (int c = 0; c < 3; c++)
            {
                int expected = p[2][c].GetInt32(), actual = img.Pixels[(y * img.Width + x) * 3 + c];
                Assert.True(Math.Abs(expected - actual) <= 2, $"pixel ({y},{x}) channel {c}: Pillow {expected}, ours {actual}");
            }
        }
        // Mean level within a quarter of a level (libjpeg vs Skia differences are sparse and unbiased).
        double meanDiff = (img.Pixels.Sum(b => (long)b) - d.GetProperty("byte_sum").GetInt64()) / (double)img.Pixels.Length;
        Assert.True(Math.Abs(meanDiff) <= 0.25, $"mean byte differs from Pillow's by {meanDiff}");
    }

    [Fact]
    public void Jpeg_preprocessing_matches_pillow_summary()
    {
        var p = JpegGold.Value.RootElement.GetProperty("preprocess");
        var cfg = Cfg(248, 224);
        var chw = ImagePreprocessor.ToChw(ImageDecoder.Decode(ImageFixture(Jpeg)), cfg);
        Assert.Equal(3 * 224 * 224, chw.Length);
        double sum = chw.Sum(v => (double)v), absSum = chw.Sum(v => Math.Abs((double)v));
        // 0.004 per value is about half a grey level after (v/255 - 0.5) / 0.5.
        Assert.True(Math.Abs(sum - p.GetProperty("sum").GetDouble()) <= 0.004 * chw.Length, $"sum {sum} vs Pillow {p.GetProperty("sum").GetDouble()}");
        Assert.True(Math.Abs(absSum - p.GetProperty("abs_sum").GetDouble()) <= 0.004 * chw.Length, $"abs sum {absSum} vs Pillow {p.GetProperty("abs_sum").GetDouble()}");
        var positions = p.GetProperty("positions").EnumerateArray().ToArray();
        var values = p.GetProperty("values").EnumerateArray().Select(v => v.GetDouble()).ToArray();
        Assert.Equal(20, positions.Length);
        for (int i = 0; i < positions.Length; i++)
        {
            int c = positions[i][0].GetInt32(), y = positions[i][1].GetInt32(), x = positions[i][2].GetInt32();
            double ours = chw[(c * 224 + y) * 224 + x];
            Assert.True(Math.Abs(ours - values[i]) <= 0.04, $"CHW ({c},{y},{x}): Pillow {values[i]}, ours {ours}");   // ~2.5 levels
        }
    }

    [Fact]
    public void Batch_stacks_chw_arrays()
    {
        float[] a = Enumerable.Range(0, 12).Select(i => (float)i).ToArray(), b = Enumerable.Range(100, 12).Select(i => (float)i).ToArray();
        using var t = ImagePreprocessor.Batch([a, b], 2, 2);
        Assert.Equal(new long[] { 2, 3, 2, 2 }, t.shape);
        Assert.Equal(torch.ScalarType.Float32, t.dtype);
        Assert.Equal(a.Concat(b), t.data<float>().ToArray());
        Assert.Equal(7f, t[0, 1, 1, 1].item<float>());
        Assert.Equal(111f, t[1, 2, 1, 1].item<float>());
        Assert.Throws<ArgumentException>(() => ImagePreprocessor.Batch([a, new float[11]], 2, 2));
    }

    static string WriteConfig(TempDir tmp, string json)
    {
        File.WriteAllText(tmp.Sub(PreprocessConfig.FileName), json);
        return tmp.Path;
    }

    [Fact]
    public void Config_loads_the_bundled_vit_settings()
    {
        using var tmp = new TempDir();
        var cfg = PreprocessConfig.Load(WriteConfig(tmp, """
            {"do_resize": true, "size": {"shortest_edge": 248}, "resample": 3, "crop_pct": 0.9, "do_center_crop": true,
             "crop_size": {"height": 224, "width": 224}, "do_rescale": true, "rescale_factor": 0.00392156862745098,
             "do_normalize": true, "image_mean": [0.5,0.5,0.5], "image_std": [0.5,0.5,0.5]}
            """));
        Assert.True(cfg.DoResize);
        Assert.Equal(248, cfg.ShortestEdge);
        Assert.Null(cfg.ResizeHeight);
        Assert.Null(cfg.ResizeWidth);
        Assert.True(cfg.DoCenterCrop);
        Assert.Equal((224, 224), (cfg.CropHeight, cfg.CropWidth));
        Assert.True(cfg.DoRescale);
        Assert.Equal(0.00392156862745098, cfg.RescaleFactor);
        Assert.True(cfg.DoNormalize);
        Assert.Equal(new[] { 0.5f, 0.5f, 0.5f }, cfg.Mean);
        Assert.Equal(new[] { 0.5f, 0.5f, 0.5f }, cfg.Std);
        Assert.Equal((224, 224), ImagePreprocessor.OutputSize(500, 375, cfg));
    }

    [Fact]
    public void Config_reads_other_size_forms_and_defaults()
    {
        using var tmp = new TempDir();
        var d = PreprocessConfig.Load(tmp.Path);   // no file: HF ViT defaults
        Assert.Equal((true, (int?)null, (int?)224, (int?)224, false), (d.DoResize, d.ShortestEdge, d.ResizeHeight, d.ResizeWidth, d.DoCenterCrop));
        Assert.Equal((true, 1.0 / 255, true), (d.DoRescale, d.RescaleFactor, d.DoNormalize));
        Assert.Equal(new[] { 0.5f, 0.5f, 0.5f }, d.Mean);
        Assert.Equal((224, 224), ImagePreprocessor.OutputSize(640, 480, d));

        var sq = PreprocessConfig.Load(WriteConfig(tmp, """{"size": 384, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}"""));
        Assert.Equal(((int?)null, (int?)384, (int?)384, false), (sq.ShortestEdge, sq.ResizeHeight, sq.ResizeWidth, sq.DoCenterCrop));
        Assert.Equal(new[] { 0.485f, 0.456f, 0.406f }, sq.Mean);

        var hw = PreprocessConfig.Load(WriteConfig(tmp, """{"size": {"height": 240, "width": 320}, "crop_size": 200, "do_normalize": false}"""));
        Assert.Equal(((int?)240, (int?)320, true, 200, 200, false), (hw.ResizeHeight, hw.ResizeWidth, hw.DoCenterCrop, hw.CropHeight, hw.CropWidth, hw.DoNormalize));
    }

    [Theory]
    [InlineData("""{"resample": 2}""", "\"resample\"")]
    [InlineData("""{"size": {"longest_edge": 5}}""", "\"size\"")]
    [InlineData("""{"size": {"shortest_edge": 0}}""", "\"size.shortest_edge\"")]
    [InlineData("""{"do_center_crop": true}""", "\"crop_size\"")]
    [InlineData("""{"image_std": [0.5, 0, 0.5]}""", "\"image_std\"")]
    [InlineData("""{"image_mean": [0.5, 0.5]}""", "\"image_mean\"")]
    [InlineData("""{"size": """, "invalid JSON")]
    public void Config_errors_name_the_file_and_field(string json, string expected)
    {
        using var tmp = new TempDir();
        var e = Assert.Throws<LlmSnpException>(() => PreprocessConfig.Load(WriteConfig(tmp, json)));
        Assert.StartsWith(tmp.Sub(PreprocessConfig.FileName) + ":", e.Message);
        Assert.Contains(expected, e.Message);
        Assert.DoesNotContain("\n", e.Message);
    }

    [Fact]
    public void Image_set_loads_labels_from_the_folder_and_its_images_subfolder()
    {
        using var tmp = new TempDir();
        Directory.CreateDirectory(tmp.Sub("images"));
        File.WriteAllBytes(tmp.Sub("top.png"), [1]);
        File.WriteAllBytes(Path.Combine(tmp.Sub("images"), "a.JPEG"), [2]);
        File.WriteAllBytes(Path.Combine(tmp.Sub("images"), "b.JPEG"), [3]);
        File.WriteAllText(tmp.Sub("labels.tsv"), "a.JPEG\t472\tn02951358\r\nb.JPEG\t0\ntop.png\t999\t\n\n");
        var set = ImageSet.Load(tmp.Path);
        Assert.Equal(3, set.Images.Count);
        Assert.Equal(new LabelledImage(Path.Combine(tmp.Sub("images"), "a.JPEG"), 472, "n02951358"), set.Images[0]);
        Assert.Equal(new LabelledImage(Path.Combine(tmp.Sub("images"), "b.JPEG"), 0, null), set.Images[1]);
        Assert.Equal(new LabelledImage(tmp.Sub("top.png"), 999, null), set.Images[2]);
    }

    [Theory]
    [InlineData("b.JPEG\tseven\n", "class index")]
    [InlineData("b.JPEG\n", "field")]
    [InlineData("b.JPEG\t-1\n", "class index")]
    [InlineData("missing.JPEG\t1\n", "not found")]
    public void Image_set_malformed_line_names_file_and_line(string secondLine, string expected)
    {
        using var tmp = new TempDir();
        Directory.CreateDirectory(tmp.Sub("images"));
        File.WriteAllBytes(Path.Combine(tmp.Sub("images"), "a.JPEG"), [2]);
        File.WriteAllBytes(Path.Combine(tmp.Sub("images"), "b.JPEG"), [3]);
        File.WriteAllText(tmp.Sub("labels.tsv"), "a.JPEG\t1\n" + secondLine);
        var e = Assert.Throws<LlmSnpException>(() => ImageSet.Load(tmp.Path));
        Assert.StartsWith(tmp.Sub("labels.tsv") + ":2: ", e.Message);
        Assert.Contains(expected, e.Message);
        Assert.DoesNotContain("\n", e.Message);

        var missing = Assert.Throws<LlmSnpException>(() => ImageSet.Load(tmp.Sub("images")));
        Assert.Contains("labels.tsv", missing.Message);
    }

    [Fact]
    public void Decoding_a_corrupt_or_truncated_file_names_the_file()
    {
        using var tmp = new TempDir();
        var rnd = new Random(7);
        var junk = new byte[4096];
        rnd.NextBytes(junk);
        string bad = tmp.Sub("corrupt.jpg");
        File.WriteAllBytes(bad, junk);
        var e = Assert.Throws<LlmSnpException>(() => ImageDecoder.Decode(bad));
        Assert.StartsWith(bad + ": cannot decode image (", e.Message);
        Assert.DoesNotContain("\n", e.Message);

        var jpeg = File.ReadAllBytes(ImageFixture(Jpeg));
        string cut = tmp.Sub("truncated.jpg");
        File.WriteAllBytes(cut, jpeg[..(jpeg.Length / 2)]);
        var t = Assert.Throws<LlmSnpException>(() => ImageDecoder.Decode(cut));
        Assert.StartsWith(cut + ": cannot decode image (", t.Message);

        var none = Assert.Throws<LlmSnpException>(() => ImageDecoder.Decode(tmp.Sub("nope.png")));
        Assert.StartsWith(tmp.Sub("nope.png") + ": cannot decode image (", none.Message);
    }
}
