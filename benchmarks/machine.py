"""
The one line every benchmark prints (or records) above its figures: the CPU and GPU they ran on.
A time means little without it: the same GPT-2 decoding step takes 51.9 ms on one 2-vCPU VM and
33.9 ms on a Xeon with AMX, and only the instruction sets tell the two apart.
"""

import os

import torch

INSTRUCTION_SETS = (("avx512f", "AVX512"), ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX"))


def cpu_line(cpuinfo="/proc/cpuinfo"):
    """'MODEL (N CPUs; AVX512, AVX512-BF16, no AMX)', from the kernel's CPU description."""
    model, flags = "CPU model unknown", set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    sets = [name if flag in flags else f"no {name}" for flag, name in INSTRUCTION_SETS]
    if "amx_tile" in flags:
        sets.append("AMX-BF16" if "amx_bf16" in flags else "no AMX-BF16")
    return f"{model} ({len(os.sched_getaffinity(0))} CPUs; {', '.join(sets)})"


def describe():
    """The CPU, the GPUs when CUDA has any, and torch's version."""
    line = cpu_line()
    if torch.cuda.is_available():
        line += f"; GPU: {torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return f"{line}; torch {torch.__version__}"


def machine_line():
    return f"machine: {describe()}"


if __name__ == "__main__":
    print(machine_line())
