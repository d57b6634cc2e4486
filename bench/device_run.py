"""python -m bench.device_run OUT: everything one short GPU session checks, in one command.

A lent GPU comes for minutes and with nothing installed, so this installs nothing and runs, in
order of what matters most if time runs out, each step under its own time limit:
  1. the Triton backend's tests on the GPU (pytest, the kernel ops' files);
  2. quick autotune sweeps in bf16 for every tunable op, and of the GEMM ops on FP8-block
     weights (as DeepSeek's checkpoints ship): each checks the heuristic and every candidate
     against the reference at DeepSeek-V3 shapes, and writes tuned files that can ship as
     defaults (ds_kernels/configs/) for this GPU and these versions;
  3. the benchmark suite (python -m bench --quick --device cuda).
Everything lands under OUT: steps.json (each step's command, exit code, seconds), each step's
log, the tuning files, and the benchmark's JSON / table / plots. A step past its limit is
stopped and the next one starts. Budget: STEPS' limits sum to 8 minutes.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

KERNEL_TESTS = ["tests/test_route.py", "tests/test_moe_align.py", "tests/test_grouped_mm.py",
                "tests/test_fused_moe.py", "tests/test_rms_norm.py", "tests/test_rope.py",
                "tests/test_mla_cache_write.py", "tests/test_mla_decode.py",
                "tests/test_mla_prefill.py", "tests/test_quant_linear.py"]
SWEPT = ["fused_moe", "mla_decode", "route", "grouped_mm", "mla_prefill"]
SWEPT_FP8 = ["fused_moe", "quant_linear"]
SWEEP_SECONDS = 25
ROOT = Path(__file__).resolve().parents[1]


def steps(out: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed), in the order they run."""
    python = sys.executable
    tests = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
             f"--junitxml={out / 'pytest.xml'}", *KERNEL_TESTS]
    sweep = [python, "-m", "autotune", "sweep", "--quick", "--out", str(out / "tuning")]
    sweeps = [(f"sweep-{op}", [*sweep, "--op", op, "--dtype", "bfloat16"], SWEEP_SECONDS)
              for op in SWEPT]
    sweeps += [(f"sweep-{op}-fp8", [*sweep, "--op", op, "--dtype", "fp8", "--activations",
                                    "bfloat16"], SWEEP_SECONDS) for op in SWEPT_FP8]
    bench = [python, "-m", "bench", "--quick", "--device", "cuda", "--out", str(out / "bench")]
    return [("tests", tests, 150), *sweeps, ("bench", bench, 150)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(__doc__)
    out = Path(argv[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("DS_KERNELS_BACKEND", None)
    record = []
    for name, command, limit in steps(out):
        start = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      cwd=ROOT, timeout=limit).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        record.append(dict(step=name, command=" ".join(command), exit=code, limit_s=limit,
                           seconds=round(time.perf_counter() - start, 1)))
        (out / "steps.json").write_text(json.dumps(record, indent=1))
        print(f"{name}: {code} in {record[-1]['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
