#!/usr/bin/env bash
# Restores packages, makes TorchSharp's native library loadable on this machine, and builds.
# Idempotent: a second run only re-checks. Prints each step on stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { echo "[setup] $*" >&2; }
trap 'rc=$?; say "error: setup.sh line $LINENO failed (exit $rc)"' ERR   # never end silently

command -v dotnet >/dev/null || { say "error: the .NET SDK (dotnet) is not on PATH; install .NET 10 first"; exit 1; }
command -v python3 >/dev/null || { say "error: python3 is needed to check TorchSharp's native library"; exit 1; }

say "dotnet restore (NuGet packages: TorchSharp-cpu, Microsoft.ML.Tokenizers, Tokenizers.DotNet, LLamaSharp + its CPU backend, System.CommandLine, SkiaSharp, ScottPlot, xunit)"
# A package feed can fail for a moment (network, feed restart): retry, and show NuGet's own error lines.
log="$(mktemp)"; trap 'rm -f "$log"' EXIT
for attempt in 1 2 3 4; do
  if dotnet restore LlmSnp.sln --verbosity minimal >"$log" 2>&1; then break; fi
  grep -E "error|warn" "$log" | sort -u | head -20 >&2 || tail -20 "$log" >&2
  if [ "$attempt" = 4 ]; then say "error: dotnet restore failed 4 times (NuGet feed: see the lines above)"; exit 1; fi
  say "dotnet restore failed (attempt $attempt of 4); retrying in $((attempt * 15)) s"
  sleep $((attempt * 15))
done

# TorchSharp-cpu 0.107.0's libLibTorchSharp.so asks for GLIBCXX_3.4.32 for one unused marker symbol;
# Debian 12's libstdc++ stops at 3.4.30. Where the system library is older, mark that requirement
# weak (one byte, verified unused by any relocation); where it is new enough, leave the file alone.
pkgs="${NUGET_PACKAGES:-$HOME/.nuget/packages}"
native="$pkgs/torchsharp/0.107.0/runtimes/linux-x64/native/libLibTorchSharp.so"
# awk reads to the end: leaving early would SIGPIPE ldconfig (its 64 KB listing outgrows the pipe)
# and, under pipefail, end this script silently (the cause of a CI failure in 1 of ~5 runs).
libstdcxx="$(ldconfig -p 2>/dev/null | awk '/libstdc\+\+\.so\.6 .*x86-64/ && !found {print $NF; found = 1}')"
if [ -n "$libstdcxx" ] && grep -q "GLIBCXX_3\.4\.32" "$libstdcxx"; then
  say "libstdc++ ($libstdcxx) provides GLIBCXX_3.4.32: TorchSharp loads as shipped"
elif [ -f "$native" ]; then
  say "libstdc++ lacks GLIBCXX_3.4.32: marking that requirement weak in $native"
  python3 tools/elf_weak_version.py "$native" >&2
else
  say "warning: $native not found after restore"
fi

say "dotnet build -c Release"
dotnet build LlmSnp.sln -c Release --no-restore --verbosity quiet -nologo >&2
# The build copies the native library next to the binaries; make sure those copies are patched too.
for f in src/*/bin/Release/net10.0/linux-x64/libLibTorchSharp.so tests/*/bin/Release/net10.0/linux-x64/libLibTorchSharp.so; do
  [ -f "$f" ] || continue
  if [ -n "$libstdcxx" ] && ! grep -q "GLIBCXX_3\.4\.32" "$libstdcxx"; then python3 tools/elf_weak_version.py "$f" >/dev/null; fi
done
say "build ready: ./llmsnp --help"
