"""Machine instructions per loop iteration of a flashllm kernel variant, counted without a GPU.

    python scripts/sass_loops.py bitmap --shape llama-2-7b.up --n 16 --sparsity 0.8
    python scripts/sass_loops.py bitmap:scatter:fit --shape opt-66b.qkv --n 1 --sparsity 0.9
    python scripts/sass_loops.py tiled_csl --shape opt-175b.qkv --n 16 --sparsity 0.9 --arch sm_80
    python scripts/sass_loops.py tiled_csl --shape llama-2-7b.up --n 8 --base HEAD~1  # and the change

On an H200 the kernels are bound by instruction issue and the shared-memory pipe, not DRAM
(BENCHMARKS.md, eleventh session: 0.32 warp instructions per weight for the bitmap kernel at 80%,
issued at 0.65-0.70 of the limit). So the instructions a warp issues per weight tile are a
GPU-free proxy for a change to a kernel's loop: this compiles the launch the library would pick
(the `flashllm bench kernels --formats` spelling, options included) with NVRTC as the launcher
does, disassembles it (cuobjdump + nvdisasm: `pip install nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm`, or a CUDA toolkit on PATH), and prints every loop (a backward branch and the
instructions it spans) with its instructions by kind. The count is static: the body's
instructions once each, branches inside it included (the copies a tile's last iterations skip, a
trap path), so it bounds an iteration from above; a loop whose trip count follows the data (the
scatter decodes) runs its body that many times per tile.

The Tiled-CSL kernel is latency-bound instead (sixteenth session: at N = 8 its schedulers idle in
58-72% of cycles), so each loop also gets its shared-memory round trips (`shared_waits`): the
points where a warp stops for a shared load issued since its last such stop, about one load
latency each when few warps are there to cover it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field

# Instruction kinds, by SASS opcode (the text before the first '.'), in print order.
KINDS = {
    "shared load": ("LDS", "LDSM"),
    "shared store": ("STS",),
    "global->shared copy": ("LDGSTS", "UBLKCP", "UTMALDG", "SYNCS"),
    "global load/store": ("LDG", "STG", "RED", "ATOM", "ATOMG"),
    "tensor core": ("HMMA", "HGMMA"),
    "shuffle/reduce": ("SHFL", "REDUX"),
    "popcount/bits": ("POPC", "FLO", "BREV", "PRMT", "SHF", "LOP3", "BMSK"),
    "sync/barrier": ("BAR", "DEPBAR", "LDGDEPBAR", "WARPSYNC", "BSSY", "BSYNC", "MEMBAR", "FENCE"),
    "branch": ("BRA", "EXIT", "BRX", "RET", "CALL"),
}
_OPCODE_KIND = {op: kind for kind, ops in KINDS.items() for op in ops}
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


_REGISTER = re.compile(r"\bR(\d+)\b")
_WRITES_REGISTER = re.compile(r"R(\d+)(\.\w+)*")
# Opcodes whose operands are all read (no destination register).
_NO_DESTINATION = ("STS", "STG", "ST", "STL", "RED", "BAR", "BRA", "DEPBAR", "LDGSTS")


def _shared_load_registers(opcode: str) -> int:
    """Registers a shared-memory load writes: LDS.64/.128 two/four, LDSM.x.2/.4 two/four, else one."""
    suffix = opcode.split(".")[-1]
    if opcode.startswith("LDSM"):
        return int(suffix) if suffix in ("2", "4") else 1
    return {"64": 2, "128": 4}.get(suffix, 1)


def shared_waits(opcodes: list[str], operands: list[str]) -> int:
    """Shared-memory round trips in one pass over a loop body: the instructions that read a
    register written by a shared load issued since the last such wait. Every load issued before a
    wait is in flight during it, so loads issued together and then used cost one round trip and a
    loop of load-then-use one per load. A latency-bound kernel (few warps per scheduler, idle issue
    slots) pays about one load latency per round trip. Static and in address order: a wait that a
    branch skips is counted, and a loop-carried use (a load for the next iteration) is not."""
    pending: set[int] = set()  # registers written by loads issued since the last wait
    waits = 0
    for opcode, ops in zip(opcodes, operands):
        parts = [p.strip() for p in ops.split(",")]
        base = opcode.split(".")[0]
        dest = _WRITES_REGISTER.fullmatch(parts[0]) if base not in _NO_DESTINATION else None
        read = ",".join(parts[1:] if dest else parts)
        if any(int(r) in pending for r in _REGISTER.findall(read)):
            waits += 1
            pending.clear()
        if dest:
            first = int(dest.group(1))
            if base in ("LDS", "LDSM"):
                pending.update(first + k for k in range(_shared_load_registers(opcode)))
            else:
                pending.discard(first)  # overwritten before any read
    return waits


@dataclass
class Loop:
    start: int  # address of the first instruction (the branch target)
    end: int  # address of the backward branch
    opcodes: list[str]
    operands: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.opcodes)

    def kinds(self) -> Counter:
        return Counter(_OPCODE_KIND.get(op.split(".")[0], "other") for op in self.opcodes)

    def shared_waits(self) -> int:
        return shared_waits(self.opcodes, self.operands)


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of each instruction in cuobjdump -sass output (NOPs dropped)."""
    out = []
    for m in _LINE.finditer(text):
        opcode = m.group(3)
        if opcode != "NOP":
            out.append((int(m.group(1), 16), opcode, m.group(4)))
    return out


def loops(instructions: list[tuple[int, str, str]]) -> list[Loop]:
    """Every backward branch as a loop over the instructions from its target to itself, outermost
    first (a tail `BRA` to itself, the kernel's end marker, is not a loop)."""
    found = []
    for address, opcode, operands in instructions:
        if not opcode.startswith("BRA"):
            continue
        target = re.search(r"0x([0-9a-f]+)", operands)
        if target is None:
            continue
        start = int(target.group(1), 16)
        if start < address:
            body = [(op, operands) for a, op, operands in instructions if start <= a <= address]
            found.append(Loop(start, address, [op for op, _ in body], [ops for _, ops in body]))
    return sorted(found, key=lambda lp: (lp.start, -lp.end))


def disassemble(cubin: bytes) -> str:
    tool = shutil.which("cuobjdump") or _wheel_tool("cuobjdump")
    if tool is None:
        sys.exit("cuobjdump not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm (or a CUDA toolkit)")
    env = dict(os.environ)
    disasm = shutil.which("nvdisasm") or _wheel_tool("nvdisasm")
    if disasm is not None:
        env["PATH"] = os.path.dirname(disasm) + os.pathsep + env.get("PATH", "")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"cuobjdump failed: {done.stderr.strip()}")
    return done.stdout


def _wheel_tool(name: str) -> str | None:
    """`name` from the nvidia-cuda-* wheels (nvidia/cu13/bin or nvidia/cu12/bin)."""
    try:
        import nvidia
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for sub in ("cu13", "cu12", "cuda_cuobjdump", "cuda_nvdisasm"):
            path = os.path.join(root, sub, "bin", name)
            if os.path.isfile(path):
                if not os.access(path, os.X_OK):  # wheels unpacked by hand can lose the bit
                    os.chmod(path, 0o755)
                return path
    return None


def variant(spec: str, shape: str, n: int, sparsity: float, arch: str):
    """(format, source file, kernel name, defines) of the launch the library picks for `spec` (a
    `flashllm bench kernels --formats` entry) on layer `shape` at `n` rows and `sparsity`, on a GPU
    of `arch` (sm_80 or sm_90); a fitted value buffer resolved as for a large layer of that sparsity."""
    from flashllm.bench.kernels import ALL_SHAPES, parse_format
    from flashllm.kernels import configs

    if shape not in ALL_SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; shapes are {', '.join(ALL_SHAPES)}")
    fmt, options = parse_format(spec)
    cfg = configs.get_config(arch.replace("_", ""), fmt, *ALL_SHAPES[shape], n, sparsity)
    if options:
        cfg = configs.with_options(cfg, options, fmt)
    cfg = configs.typical_fit(cfg, sparsity)
    return fmt, cfg, configs.kernel_source(fmt), f"flashllm_{fmt}_spmm", cfg.defines(fmt)


def weights_per_warp_iteration(fmt: str, cfg) -> int:
    """Weights a warp covers per iteration of the kernel's main loop (one tile): a bitmap tile is
    64 x 64 per strip over 4 warps, a Tiled-CSL tile 128 x 64 over its warps, a tiled_csl16 tile
    16 x 64 by one warp."""
    if fmt == "bitmap":
        return 64 * 64 * cfg.strips // 4
    if fmt == "tiled_csl16":
        return 16 * 64
    return 128 * 64 // cfg.warps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="a --formats entry: bitmap, tiled_csl, bitmap:scatter:fit, ...")
    parser.add_argument("--shape", default="llama-2-7b.up", help="a `flashllm bench kernels` layer name")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--arch", default="sm_90", choices=["sm_80", "sm_90"])
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--sass", help="also write the whole disassembly here")
    parser.add_argument("--base", metavar="REF",
                        help="also count the same launch (this tree's defines) compiled from the kernel sources "
                             "at git revision REF, and print the main loop's change")
    args = parser.parse_args(argv)

    import torch

    from flashllm.kernels import launch

    fmt, cfg, source, kernel, defines = variant(args.spec, args.shape, args.n, args.sparsity, args.arch)
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    cubin = launch.compile_image(source, kernel, launch.compile_options(args.arch, defines, dtype), cubin=True)
    text = disassemble(cubin)
    if args.sass:
        with open(args.sass, "w") as f:
            f.write(text)
    instructions = parse_sass(text)
    print(f"{args.spec} on {args.shape}, N = {args.n}, {args.sparsity:.0%}, {args.arch} {args.dtype}: {cfg}")
    print(f"{source} {' '.join(f'-D{k}={v}' for k, v in sorted(defines.items()))}")
    print(f"{len(instructions)} instructions in the kernel")
    header = ["loop", "instructions", *KINDS, "other", "shared-load waits"]
    print(" | ".join(header))
    found = loops(instructions)
    for lp in found:
        kinds = lp.kinds()
        print(" | ".join([f"{lp.start:#06x}-{lp.end:#06x}", str(lp.size), *(str(kinds.get(k, 0)) for k in [*KINDS, "other"]),
                          str(lp.shared_waits())]))
    if found:
        main_loop = find_main_loop(found)
        per = weights_per_warp_iteration(fmt, cfg)
        print(f"main loop {main_loop.start:#06x}-{main_loop.end:#06x}: {main_loop.size} instructions per warp and "
              f"tile of {per} weights per warp, {main_loop.size / per:.3f} per weight, {main_loop.shared_waits()} "
              f"waits on shared-memory loads (inner loops once)")
        if args.base:
            options = launch.compile_options(args.arch, defines, dtype)
            sources = {name: git_show(args.base, name) for name in (source, launch.HEADER)}
            headers = {launch.HEADER: sources[launch.HEADER]}
            cubin = launch.nvrtc().compile(sources[source], source, options, headers, True)
            base_found = loops(parse_sass(disassemble(cubin)))
            if base_found:
                base = find_main_loop(base_found)
                print(f"at {args.base}: main loop {base.size} instructions per warp and tile "
                      f"({main_loop.size - base.size:+d} now, {main_loop.size / base.size - 1:+.1%}), "
                      f"{base.shared_waits()} waits on shared-memory loads ({main_loop.shared_waits() - base.shared_waits():+d} now)")
    return 0


def find_main_loop(found: list[Loop]) -> Loop:
    """The innermost loop holding the most tensor-core instructions (an outer backward branch, a
    split-K fixup's retry or a stream-K strip loop, can span the tile loop with the same count);
    without any (the CUDA-core path), the largest loop."""
    most = max(lp.kinds().get("tensor core", 0) for lp in found)
    if most == 0:
        return max(found, key=lambda lp: lp.size)
    return min((lp for lp in found if lp.kinds().get("tensor core", 0) == most), key=lambda lp: lp.size)


def git_show(ref: str, name: str) -> str:
    """Kernel source file `name` as it was at git revision `ref`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["git", "show", f"{ref}:src/flashllm/kernels/cuda/{name}"], cwd=root,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"git show {ref}:{name} failed: {done.stderr.strip()}")
    return done.stdout


if __name__ == "__main__":
    sys.exit(main())
