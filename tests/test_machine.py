"""benchmarks/machine.py: the hardware line names the CPU model and which of AVX512, AVX512-BF16 and AMX it has."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from machine import cpu_line  # noqa: E402


def cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    block = f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse2 {flags}\n\n"
    path.write_text(block * 2)
    return str(path)


def test_cpu_line_names_the_model_and_instruction_sets(tmp_path):
    amx = cpu_line(cpuinfo(tmp_path, "avx512f avx512_bf16 amx_tile amx_bf16"))
    assert amx.startswith("Intel(R) Xeon(R) Platinum 8480+ (")
    assert amx.endswith("CPUs; AVX512, AVX512-BF16, AMX, AMX-BF16)")
    assert cpu_line(cpuinfo(tmp_path, "avx512f avx512_bf16")).endswith("CPUs; AVX512, AVX512-BF16, no AMX)")
    assert cpu_line(cpuinfo(tmp_path, "avx2")).endswith("CPUs; no AVX512, no AVX512-BF16, no AMX)")


def test_cpu_line_without_proc_cpuinfo(tmp_path):
    assert cpu_line(str(tmp_path / "absent")).startswith("CPU model unknown (")
