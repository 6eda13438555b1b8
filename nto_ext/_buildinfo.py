"""Compiler flags shared by setup.py and the JIT build, so both build the same thing.

Kept free of torch imports: setup.py imports it before deciding what to build.
"""

# The compiled module embeds this marker followed by the torch version it was built
# against; ops.py reads it from the file *before* loading it (loading a module built
# against another torch can crash the process).
MARKER = "nto-ext-built-against-torch:"


def compile_args(torch_version: str, cuda: bool = False, shell: bool = False) -> list[str]:
    """C++ flags: -O3, OpenMP (ATen's parallel_for is OpenMP in torch's CPU builds),
    -ffp-contract=off (GCC fuses a*b+c otherwise, even in ISO mode: the AdamW kernel
    rounds each op as torch does, see csrc/adamw_math.h).

    shell=True escapes the quotes for the JIT build, whose ninja file goes through a shell.
    """
    q = '\\"' if shell else '"'
    args = ["-O3", "-fopenmp", "-ffp-contract=off", "-std=c++17",
            f"-DNTO_TORCH_VERSION={q}{torch_version}{q}"]
    if cuda:
        args.append("-DNTO_WITH_CUDA")
    return args


def cuda_args(torch_version: str, shell: bool = False) -> list[str]:
    """nvcc flags for csrc/cuda/*.cu (torch adds its own: arch from TORCH_CUDA_ARCH_LIST or
    the visible GPU, half/bf16 operator switches, --expt-relaxed-constexpr). The kernels
    round each AdamW op explicitly (__fmul_rn, ...), so nvcc's default fmad is harmless.

    shell=True escapes the quotes for the JIT build, as compile_args does.
    """
    q = '\\"' if shell else '"'
    return ["-O3", "-std=c++17", f"-DNTO_TORCH_VERSION={q}{torch_version}{q}",
            "-DNTO_WITH_CUDA", "-Xcompiler", "-ffp-contract=off"]


def path_with_ninja(path: str) -> str:
    """`path` (a PATH value) with the pip package ninja's folder added when it has no ninja.

    torch's cpp_extension runs `ninja` from PATH: the JIT build refuses to start without it
    and setup.py falls back to a slow serial build. The package `ninja` (a dependency of
    nto_ext) installs it in its environment's scripts folder, which is on PATH only while
    the environment is activated; a python run by its full path needs it added.
    """
    import os
    import shutil

    if shutil.which("ninja", path=path):
        return path
    try:
        import ninja
    except ImportError:  # torch's error then says ninja is missing
        return path
    folder = getattr(ninja, "BIN_DIR", "")
    return os.pathsep.join(p for p in (folder, path) if p)
