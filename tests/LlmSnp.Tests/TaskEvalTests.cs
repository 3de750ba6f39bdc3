using System.Text.Json.Nodes;
using LlmSnp.Data;
using LlmSnp.Evaluation.Tasks;
using LlmSnp.Models;
using LlmSnp.Pruning;
using static TorchSharp.torch;

namespace LlmSnp.Tests;

/// <summary>
/// `eval tasks`: per-request loglikelihoods of the packed, streamed path against a float64 forward of each request
/// alone (lm-eval's request rules written again here), the tokenization splits, the packed-row block forward of every
/// family, the metrics, and bad input.
/// </summary>
public class TaskEvalTests
{
    static string Stories => Path.Combine(Repo.Root, "models", "stories260k");
    static string OptTiny => Path.Combine(Repo.Root, "models", "opt-tiny-c4-v2");
    static string ModelDir(string name) => name == "stories260k" ? Stories : OptTiny;

    // ------------------------------------------------------------------ the second implementation

    /// <summary>
    /// lm-eval 4e7e0d4's request, written from its source independently of the library: `TemplateLM.loglikelihood`
    /// (empty context → [bos or eos] + continuation without special tokens), `_encode_pair` (trailing context whitespace
    /// moved; context + continuation encoded whole, the context's tokens cut off), `_loglikelihood_tokens` (cut from the
    /// left to max_length + 1, last token dropped).
    /// </summary>
    static (int[] Input, int[] Continuation) LmEvalRequest(ITextTokenizer tok, string context, string continuation, int maxLength)
    {
        int[] ctx, cont;
        if (context == "")
        {
            int prefix = tok.BosId ?? tok.EosId!.Value;
            var c = tok.EncodeWithoutSpecialTokens(continuation);
            (ctx, cont) = c[0] == prefix ? (new[] { prefix }, c[1..]) : (new[] { prefix }, c);
        }
        else
        {
            int n = context.Length;
            while (n > 0 && char.IsWhiteSpace(context[n - 1])) n--;
            continuation = context[n..] + continuation;
            context = context[..n];
            var whole = tok.Encode(context + continuation);
            ctx = tok.Encode(context);
            cont = whole.Skip(ctx.Length).ToArray();
        }
        var full = ctx.Concat(cont).ToArray();
        full = full.Skip(Math.Max(0, full.Length - (maxLength + 1))).ToArray();
        return (full[..^1], cont);
    }

    /// <summary>One full-sequence forward per request in float64 with every block resident: Σ log p(continuation) and whether each token is the argmax.</summary>
    sealed class Reference : IDisposable
    {
        readonly ILanguageModel _m;
        readonly List<IPrunableBlock> _blocks;

        public Reference(string dir)
        {
            _m = ModelFamilies.OpenLanguageModel(dir, CPU, ScalarType.Float64);
            _blocks = Enumerable.Range(0, _m.BlockCount).Select(_m.LoadBlock).ToList();
        }

        public ITextTokenizer Tokenizer => _m.Tokenizer();
        public int MaxLength => _m.MaxPositions;

        public (double LogLikelihood, bool Greedy) Score(int[] input, int[] continuation)
        {
            using var scope = NewDisposeScope();
            var h = _m.Embed(torch.tensor(input.Select(x => (long)x).ToArray(), new long[] { 1, input.Length }));
            foreach (var b in _blocks) h = b.Forward(h)!;
            var lp = _m.Head(h).squeeze(0).log_softmax(1);
            double sum = 0;
            bool greedy = true;
            for (int j = 0; j < continuation.Length; j++)
            {
                int at = input.Length - continuation.Length + j;
                sum += lp[at, continuation[j]].item<double>();
                greedy &= lp[at].argmax().item<long>() == continuation[j];
            }
            return (sum, greedy);
        }

        public void Dispose()
        {
            _blocks.ForEach(b => b.Dispose());
            _m.Dispose();
        }
    }

    /// <summary>
    /// A few documents of every task, with the cases that matter: WinoGrande (partial scoring), PIQA docs whose choices
    /// end in spaces (1, 13), BLiMP (empty context) from two paradigms, and BoolQ doc 3154 (4843 characters: longer than
    /// either model's 512-token context).
    /// </summary>
    static IReadOnlyList<TaskSet> Sample()
    {
        var extra = new Dictionary<string, int[]> { ["piqa"] = new[] { 1, 13 }, ["boolq"] = new[] { 3154 } };
        var sets = new List<TaskSet>();
        foreach (var name in TaskCatalog.Known.Keys)
        {
            var all = TaskCatalog.Load(name, null)[0];
            var ids = new HashSet<int> { 0, 1, 2 };
            foreach (var x in extra.GetValueOrDefault(name, Array.Empty<int>())) ids.Add(x);
            var docs = name == "blimp"
                ? all.Docs.GroupBy(d => d.Group).Take(2).SelectMany(g => g.Take(2)).ToList()
                : all.Docs.Where(d => ids.Contains(d.DocId)).ToList();
            sets.Add(all with { Docs = docs });
        }
        return sets;
    }

    [Theory]
    [InlineData("stories260k", ScalarType.Float64, 1e-9)]
    [InlineData("opt-tiny-c4-v2", ScalarType.Float64, 1e-9)]
    [InlineData("stories260k", ScalarType.Float32, 2e-3)]
    [InlineData("opt-tiny-c4-v2", ScalarType.Float32, 2e-3)]
    public void Loglikelihoods_equal_a_float64_forward_of_each_request(string name, ScalarType dtype, double tol)
    {
        string dir = ModelDir(name);
        var sets = Sample();
        using var model = ModelFamilies.OpenLanguageModel(dir, CPU, dtype);
        var run = TaskEvalJob.Evaluate(model, model.Tokenizer(), sets, BosPolicy.Auto, null);
        using var reference = new Reference(dir);
        var tok = reference.Tokenizer;
        Assert.True(run.Encoded.Truncated >= 1, "BoolQ doc 3154 should be cut to the context");
        Assert.True(run.Encoded.Tokens < run.Encoded.UnsharedTokens, "choices should share their context");
        int checkedRequests = 0;
        for (int r = 0; r < run.Encoded.Rows.Count; r++)
        {
            var row = run.Encoded.Rows[r];
            var doc = sets[row.Task].Docs[row.Doc];
            for (int k = 0; k < doc.Requests.Count; k++)
            {
                var (input, cont) = LmEvalRequest(tok, doc.Requests[k].Context, doc.Requests[k].Continuation, reference.MaxLength);
                Assert.Equal(cont, row.Scored[k].Targets);
                var (ll, greedy) = reference.Score(input, cont);
                double got = run.Results.LogLikelihood[r][k];
                Assert.True(Math.Abs(got - ll) <= tol * Math.Max(1, Math.Abs(ll)),
                    $"{name} {dtype} {sets[row.Task].Name} doc {doc.DocId} choice {k}: {got:R} vs float64 reference {ll:R}");
                if (dtype == ScalarType.Float64) Assert.Equal(greedy, run.Results.Greedy[r][k]);
                checkedRequests++;
            }
        }
        Assert.Equal(run.Encoded.Requests, checkedRequests);
        // The cases named above are really in the sample.
        Assert.Contains(sets.Single(s => s.Name == "piqa").Docs.SelectMany(d => d.Requests), q => q.Continuation.EndsWith(' '));
        Assert.All(sets.Single(s => s.Name == "blimp").Docs.SelectMany(d => d.Requests), q => Assert.Equal("", q.Context));
        Assert.All(sets.Single(s => s.Name == "winogrande").Docs, d => Assert.NotEqual(d.Requests[0].Context, d.Requests[1].Context));
    }

    /// <summary>The scores follow from the loglikelihoods as lm-eval's process_results computes them.</summary>
    [Fact]
    public void Scores_follow_from_the_loglikelihoods()
    {
        var sets = Sample();
        using var model = ModelFamilies.OpenLanguageModel(Stories, CPU, ScalarType.Float32);
        var run = TaskEvalJob.Evaluate(model, model.Tokenizer(), sets, BosPolicy.Auto, null);
        foreach (var score in run.Summary.Tasks)
        {
            int t = sets.ToList().FindIndex(s => s.Name == score.Name);
            var rows = Enumerable.Range(0, run.Encoded.Rows.Count).Where(r => run.Encoded.Rows[r].Task == t).ToList();
            double acc = rows.Average(r =>
            {
                var lls = run.Results.LogLikelihood[r];
                int best = Array.IndexOf(lls, lls.Max());
                return best == sets[t].Docs[run.Encoded.Rows[r].Doc].Gold ? 1.0 : 0.0;
            });
            if (score.Groups is null) Assert.Equal(acc, score.Acc, 12);
            Assert.Equal(sets[t].HasAccNorm, score.AccNorm.HasValue);
        }
        Assert.Equal(run.Summary.Tasks.Average(t => t.Acc), run.Summary.MeanAcc, 12);
    }

    // ------------------------------------------------------------------ tokenization

    /// <summary>
    /// Where the context's last token merges with the continuation's first, lm-eval scores the tokens of the whole string
    /// after the context's own count: the continuation's tokens are not those it has alone.
    /// </summary>
    [Theory]
    [InlineData("stories260k", "Once upon a ti", "me there was a cat")]
    [InlineData("stories260k", "She was happ", "y and sang.")]
    [InlineData("opt-tiny-c4-v2", "The cat sat on the ma", "t and then slept")]
    [InlineData("opt-tiny-c4-v2", "I have a question about basket", "ball games")]
    public void Context_and_continuation_are_split_from_one_encoding(string name, string context, string continuation)
    {
        using var model = ModelFamilies.OpenLanguageModel(ModelDir(name), CPU, ScalarType.Float32);
        var tok = model.Tokenizer();
        var enc = new RequestEncoder(tok, BosPolicy.Auto);
        var (ctx, cont) = enc.Encode(context, continuation);
        var whole = tok.Encode(context + continuation);
        Assert.Equal(tok.Encode(context), ctx);
        Assert.Equal(whole.Skip(ctx.Length), cont);
        // The merge is real: the context's tokens are not a prefix of the whole, and the continuation alone tokenizes otherwise.
        Assert.NotEqual(ctx, whole.Take(ctx.Length));
        Assert.NotEqual(tok.EncodeWithoutSpecialTokens(continuation), cont);
    }

    [Theory]
    [InlineData("stories260k")]
    [InlineData("opt-tiny-c4-v2")]
    public void Trailing_context_spaces_move_to_the_continuation_and_empty_contexts_become_the_prefix_token(string name)
    {
        using var model = ModelFamilies.OpenLanguageModel(ModelDir(name), CPU, ScalarType.Float32);
        var tok = model.Tokenizer();
        var enc = new RequestEncoder(tok, BosPolicy.Auto);
        SameRequest(enc.Encode("Question: why?\nAnswer:", " yes"), enc.Encode("Question: why?\nAnswer: ", "yes"));
        SameRequest(enc.Encode("Answer:", " \tyes"), enc.Encode("Answer: \t", "yes"));
        int bos = tok.BosId!.Value;
        var (ctx, cont) = enc.Encode("", " The cat sleeps.");
        Assert.Equal(new[] { bos }, ctx);
        Assert.Equal(tok.EncodeWithoutSpecialTokens(" The cat sleeps."), cont);
        Assert.Equal(bos, tok.Encode("The cat")[0]);   // both tokenizers prepend bos by default (tokenizer_config.json)
        Assert.DoesNotContain(bos, cont);
    }

    [Fact]
    public void Add_bos_false_drops_the_bos_true_keeps_it()
    {
        using var model = ModelFamilies.OpenLanguageModel(Stories, CPU, ScalarType.Float32);
        var tok = model.Tokenizer();
        var auto = new RequestEncoder(tok, BosPolicy.Auto).Encode("Once upon a time", " there");
        var off = new RequestEncoder(tok, BosPolicy.False).Encode("Once upon a time", " there");
        var on = new RequestEncoder(tok, BosPolicy.True).Encode("Once upon a time", " there");
        Assert.Equal(1, auto.Context[0]);
        Assert.Equal(auto.Context[1..], off.Context);
        Assert.Equal(auto.Continuation, off.Continuation);
        SameRequest(auto, on);
    }

    static void SameRequest((int[] Context, int[] Continuation) a, (int[] Context, int[] Continuation) b)
    {
        Assert.Equal(a.Context, b.Context);
        Assert.Equal(a.Continuation, b.Continuation);
    }

    // ------------------------------------------------------------------ the packed-row block forward, every family

    /// <summary>
    /// A batch of two rows: [shared 5 | request A 7 | request B 4] and [one 8-token sequence | padding], through
    /// Embed(ids, positions) → ForwardMasked → Head equals each sequence's own plain forward (float64). The Mistral copy has a
    /// window of 6 over sequences of 12, so the window's narrowing is exercised too.
    /// </summary>
    [Theory]
    [InlineData("golden-llama/llama-gqa-untied", null)]
    [InlineData("golden-llama/qwen2-bias-tied", null)]
    [InlineData("golden-llama/mistral-f16", 6)]
    [InlineData("golden-opt/opt-tiny-pre", null)]
    [InlineData("golden-opt/opt-tiny-post", null)]
    [InlineData("stories260k", null)]
    [InlineData("golden-families/qwen3", null)]
    [InlineData("golden-families/mixtral", 6)]
    [InlineData("golden-families/gemma2", null)]
    [InlineData("golden-families/gemma3_text", null)]
    [InlineData("golden-families/mixtral", null)]
    [InlineData("golden-families/qwen3_moe", null)]
    public void Packed_rows_equal_one_forward_per_sequence(string fixture, int? window)
    {
        using var tmp = new TempDir();
        string dir = fixture == "stories260k" ? Stories : Repo.Fixture(fixture);
        if (window is int w)
        {
            foreach (var f in Directory.GetFiles(dir)) File.Copy(f, Path.Combine(tmp.Path, Path.GetFileName(f)));
            var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp.Path, "config.json")))!.AsObject();
            cfg["sliding_window"] = w;
            File.WriteAllText(Path.Combine(tmp.Path, "config.json"), cfg.ToJsonString());
            dir = tmp.Path;
        }
        using var model = ModelFamilies.OpenLanguageModel(dir, CPU, ScalarType.Float64);
        var rng = new Random(7);
        long[] Ids(int n) => Enumerable.Range(0, n).Select(_ => (long)rng.Next(3, Math.Min(model.VocabSize, 500))).ToArray();
        long[] shared = Ids(5), a = Ids(7), b = Ids(4), c = Ids(8);
        const int T = 16;
        var ids = new long[2 * T];
        var pos = new long[2 * T];
        var seg = new int[2 * T];
        var row0 = shared.Concat(a).Concat(b).ToArray();
        for (int i = 0; i < T; i++)
        {
            ids[i] = row0[i];
            (pos[i], seg[i]) = i < 5 ? (i, 0) : i < 12 ? (i, 1) : (5 + i - 12, 2);
            ids[T + i] = i < 8 ? c[i] : 0;
            (pos[T + i], seg[T + i]) = i < 8 ? (i, 1) : (0, 100 + i);   // padding: each its own segment
        }
        var mask = new bool[2 * T * T];
        for (int r = 0; r < 2; r++)
            for (int i = 0; i < T; i++)
                for (int j = 0; j <= i; j++)
                    mask[(r * T + i) * T + j] = seg[r * T + j] == 0 || seg[r * T + j] == seg[r * T + i];
        using var scope = NewDisposeScope();
        var positions = torch.tensor(pos, new long[] { 2, T });
        var h = model.EmbedAt(torch.tensor(ids, new long[] { 2, T }), positions);
        var attend = torch.tensor(mask, new long[] { 2, T, T });
        for (int i = 0; i < model.BlockCount; i++)
            using (var block = model.LoadCachedBlock(i)) h = block.ForwardMasked(h, positions, attend);
        var packed = model.Head(h);
        Tensor Plain(long[] seq) => LlamaTests.Forward(model, torch.tensor(seq, new long[] { 1, seq.Length })).squeeze(0);
        void Same(Tensor got, Tensor want, string what)
        {
            double d = (got - want).abs().max().item<double>();
            Assert.True(d < 1e-10, $"{fixture} {what}: max |Δlogit| {d:G3}");
        }
        var sa = Plain(shared.Concat(a).ToArray());
        var sb = Plain(shared.Concat(b).ToArray());
        Same(packed[0].narrow(0, 0, 12), sa, "shared + A");
        Same(packed[0].narrow(0, 12, 4), sb.narrow(0, 5, 4), "B after the shared part");
        Same(packed[1].narrow(0, 0, 8), Plain(c), "second row");
    }

    // ------------------------------------------------------------------ metrics

    [Fact]
    public void Metric_helpers_follow_lm_eval()
    {
        Assert.Equal(0, TaskScoring.ArgMax(new[] { -1.0, -1.0 }));   // numpy: the first of equal maxima
        Assert.Equal(1, TaskScoring.ArgMax(new[] { -2.0, -1.0, -1.0 }));
        Assert.Equal(3, TaskScoring.Characters("a😀b"));           // code points, as Python's len
        Assert.Equal(4, "a😀b".Length);
        // Sample stderr of 0/1 outcomes: √(p(1−p)/(n−1)).
        var x = new double[] { 1, 0, 0, 1, 1 };
        Assert.Equal(Math.Sqrt(0.6 * 0.4 / 4), TaskScoring.MeanStderr(x)!.Value, 12);
        Assert.Null(TaskScoring.MeanStderr(new double[] { 1 }));
        // Pooled over equal-size parts with equal stderr: the same stderr over √(parts), to first order.
        double pooled = TaskScoring.PooledStderr(new (double?, int)[] { (0.1, 100), (0.1, 100) })!.Value;
        Assert.Equal(Math.Sqrt(99.0 * 0.01 * 100 * 2 / 198 / 200), pooled, 12);
        // acc_norm divides by the choice's characters: a long choice with the higher total can lose.
        var doc = new TaskDoc(0, 1, new[] { ("q", " aa"), ("q", " bbbbbbbb") }, new[] { "aa", "bbbbbbbb" }, 1, null);
        var (acc, norm) = TaskScoring.Doc(doc, new[] { -4.0, -6.0 });
        Assert.False(acc);
        Assert.True(norm);
    }

    [Fact]
    public void Limit_takes_the_first_documents_of_each_task_and_of_each_blimp_paradigm()
    {
        var sets = TaskCatalog.Load("piqa, blimp", 3);
        Assert.Equal(new[] { 0, 1, 2 }, sets[0].Docs.Select(d => d.DocId));
        Assert.Equal(1838, sets[0].DocsInFile);
        Assert.Equal(67 * 3, sets[1].Docs.Count);
        Assert.All(sets[1].Docs.GroupBy(d => d.Group), g => Assert.Equal(3, g.Count()));
        Assert.Equal(67000, sets[1].DocsInFile);
        // Sizes as PROVENANCE.md lists them.
        var sizes = new Dictionary<string, int> { ["boolq"] = 3270, ["hellaswag"] = 10042, ["winogrande"] = 1267, ["arc_easy"] = 2376, ["arc_challenge"] = 1172, ["openbookqa"] = 500 };
        foreach (var (name, n) in sizes) Assert.Equal(n, TaskCatalog.Load(name, 1)[0].DocsInFile);
    }

    // ------------------------------------------------------------------ the CLI

    static string WriteLines(TempDir tmp, string name, params string[] lines)
    {
        string path = tmp.Sub(name);
        File.WriteAllText(path, string.Join("\n", lines) + "\n");
        return path;
    }

    [Fact]
    public void Eval_tasks_reports_json_and_log_samples()
    {
        using var tmp = new TempDir();
        string samples = tmp.Sub("samples.jsonl"), json = tmp.Sub("out.json");
        var own = WriteLines(tmp, "mine.jsonl",
            "{\"context\": \"Once upon a time there was a\", \"choices\": [\"cat\", \"table of contents\"], \"gold\": 0}",
            "{\"context\": \"The sun is\", \"choices\": [\"hot\", \"cold\", \"blue\"], \"gold\": 0}");
        var r = CliHarness.Run(new[] { "eval", "tasks", "--model", Stories, "--tasks", $"piqa,winogrande,blimp,{own}", "--limit", "2",
            "--log-samples", samples, "--json", json });
        var o = CliHarness.SucceedsJson(r);
        var tasks = o["tasks"]!.AsObject();
        Assert.Equal(new[] { "piqa", "winogrande", "blimp", "mine" }, tasks.Select(kv => kv.Key));
        Assert.NotNull(tasks["piqa"]!["acc_norm"]);
        Assert.Null(tasks["winogrande"]!["acc_norm"]);
        Assert.Equal(67, tasks["blimp"]!["groups"]!.AsObject().Count);
        Assert.Equal(2, (int)tasks["mine"]!["docs"]!);
        Assert.NotNull(tasks["mine"]!["acc_norm"]);
        Assert.Contains("ETA", r.Stderr);
        var lines = File.ReadAllLines(samples).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();
        Assert.Equal(2 + 2 + 67 * 2 + 2, lines.Count);
        foreach (var name in new[] { "piqa", "winogrande", "mine" })
        {
            var mine = lines.Where(l => (string)l["task"]! == name).ToList();
            Assert.Equal((double)tasks[name]!["acc"]!, mine.Average(l => (int)l["acc"]!), 12);
            foreach (var l in mine)
            {
                var lls = l["loglikelihoods"]!.AsArray().Select(x => (double)x!).ToArray();
                Assert.Equal(lls.Length, l["is_greedy"]!.AsArray().Count);
                Assert.Equal(lls.Length, l["continuation_tokens"]!.AsArray().Count);
                Assert.Equal(Array.IndexOf(lls, lls.Max()) == (int)l["gold"]! ? 1 : 0, (int)l["acc"]!);
            }
        }
        Assert.Equal(o.ToJsonString(), JsonNode.Parse(File.ReadAllText(json))!.ToJsonString());
    }

    [Fact]
    public void Bad_input_is_one_line_exit_1_and_nothing_written()
    {
        using var tmp = new TempDir();
        string samples = tmp.Sub("samples.jsonl"), json = tmp.Sub("out.json");
        CliHarness.Result Run(string model, string tasks, params string[] more) =>
            CliHarness.Run(new[] { "eval", "tasks", "--model", model, "--tasks", tasks, "--log-samples", samples, "--json", json }.Concat(more).ToArray());
        void Refused(CliHarness.Result r, params string[] mentions)
        {
            CliHarness.FailsWithOneLine(r, onlyLine: false, 1, mentions);
            Assert.False(File.Exists(samples), "no --log-samples file on failure");
            Assert.False(File.Exists(json), "no --json file on failure");
            Assert.DoesNotContain(Directory.GetFiles(tmp.Path), f => f.Contains(".tmp-"));
        }

        Refused(Run(Stories, "piqa,sciq"), "unknown task 'sciq'", "boolq", "hellaswag", "blimp");
        var wrongShape = WriteLines(tmp, "shape.jsonl",
            "{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 0}",
            "{\"context\": \"a\", \"choices\": \"b\", \"gold\": 0}");
        Refused(Run(Stories, wrongShape), "shape.jsonl:2", "\"choices\"");
        var notJson = WriteLines(tmp, "broken.jsonl", "{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 0}", "{oops");
        Refused(Run(Stories, notJson), "broken.jsonl:2", "not valid JSON");
        var gold = WriteLines(tmp, "gold.jsonl",
            "{\"contexts\": [\"a b\", \"a c\"], \"continuation\": \"d\", \"gold\": 1}",
            "{\"contexts\": [\"a b\", \"a c\"], \"continuation\": \"d\", \"gold\": 0}",
            "{\"contexts\": [\"a b\", \"a c\"], \"continuation\": \"d\", \"gold\": 2}");
        Refused(Run(Stories, gold), "gold.jsonl:3", "gold 2 is out of range for 2 choices");
        Refused(Run(Path.Combine(Repo.Root, "models", "vit-tiny"), "piqa"), "image classifier", "eval tasks");
        Refused(Run(Stories, "piqa", "--add-bos", "maybe"), "--add-bos");

        // A model whose context is shorter than every request: a copy of stories260K with 4 positions.
        string small = tmp.Sub("small");
        Directory.CreateDirectory(small);
        foreach (var f in Directory.GetFiles(Stories)) File.Copy(f, Path.Combine(small, Path.GetFileName(f)));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(small, "config.json")))!.AsObject();
        cfg["max_position_embeddings"] = 4;
        File.WriteAllText(Path.Combine(small, "config.json"), cfg.ToJsonString());
        Refused(Run(small, "hellaswag", "--limit", "2"), "hellaswag doc 0", "more than the model's context of 4");
    }

    // ------------------------------------------------------------------ prune and compare

    [Fact]
    public void Prune_eval_tasks_scores_dense_and_pruned_in_one_run()
    {
        using var tmp = new TempDir();
        var r = CliHarness.Run(new[] { "prune", "--model", Stories, "--out", tmp.Sub("out"), "--ratio", "0.3", "--calib", "tinystories",
            "--calib-samples", "4", "--calib-seqlen", "64", "--eval", "tasks:piqa,arc_easy", "--eval-limit", "4" }, timeoutSeconds: 400);
        var o = CliHarness.SucceedsJson(r);
        foreach (var which in new[] { "dense", "pruned" })
        {
            var e = o["eval"]![which]!;
            Assert.Equal(4, (int)e["tasks"]!["piqa"]!["docs"]!);
            Assert.Equal(4, (int)e["tasks"]!["arc_easy"]!["docs"]!);
            Assert.InRange((double)e["mean"]!["acc"]!, 0, 1);
        }
        Assert.True((long)o["eval"]!["pruned"]!["parameters"]! < (long)o["eval"]!["dense"]!["parameters"]!);
    }

    [Fact]
    public void Compare_eval_tasks_writes_a_column_per_task_and_the_mean()
    {
        using var tmp = new TempDir();
        string outDir = tmp.Sub("cmp");
        var r = CliHarness.Run(new[] { "compare", "--model", OptTiny, "--out", outDir, "--ratios", "0,0.3", "--methods", "zca,magnitude", "--targets", "mlp",
            "--calib", "c4", "--calib-samples", "4", "--calib-seqlen", "64", "--eval", "tasks:piqa,winogrande", "--eval-limit", "4", "--no-speed" }, timeoutSeconds: 400);
        var o = CliHarness.SucceedsJson(r);
        var csv = File.ReadAllLines(Path.Combine(outDir, "comparison.csv"));
        var header = csv[0].Split(',');
        Assert.Equal(new[] { "piqa", "winogrande" }, header[^2..]);
        Assert.Equal(4, csv.Length);   // header, dense, two methods
        foreach (var line in csv.Skip(1))
        {
            var cells = line.Split(',');
            double mean = double.Parse(cells[Array.IndexOf(header, "metric")], System.Globalization.CultureInfo.InvariantCulture);
            double piqa = double.Parse(cells[^2], System.Globalization.CultureInfo.InvariantCulture);
            double wino = double.Parse(cells[^1], System.Globalization.CultureInfo.InvariantCulture);
            Assert.Equal((piqa + wino) / 2, mean, 9);
        }
        Assert.Equal(2, o["dense_breakdown"]!.AsObject().Count);
        Assert.All(o["rows"]!.AsArray(), row => Assert.Equal(2, row!["breakdown"]!.AsObject().Count));
        Assert.True(File.Exists(Path.Combine(outDir, "comparison-mlp.png")));
    }
}
