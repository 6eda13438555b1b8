"""Compiler flags shared by setup.py and the JIT build, so both build the same thing.

Kept free of torch imports: setup.py imports it before deciding what to build.
"""

# The compiled module embeds this marker followed by the torch version it was built
# against; ops.py reads it from the file *before* loading it (loading a module built
# against another torch can crash the process).
MARKER = "nto-ext-built-against-torch:"


def compile_args(torch_version: str, cuda: bool = False, shell: bool = False) -> list[str]:
    """C++ flags: -O3, OpenMP (ATen's parallel_for is OpenMP in torch's CPU builds).

    shell=True escapes the quotes for the JIT build, whose ninja file goes through a shell.
    """
    q = '\\"' if shell else '"'
    args = ["-O3", "-fopenmp", "-std=c++17", f"-DNTO_TORCH_VERSION={q}{torch_version}{q}"]
    if cuda:
        args.append("-DNTO_WITH_CUDA")
    return args


def cuda_args(torch_version: str) -> list[str]:
    return ["-O3", "-std=c++17", f'-DNTO_TORCH_VERSION="{torch_version}"',
            "-DNTO_WITH_CUDA"]
