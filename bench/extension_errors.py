"""Which C++ exceptions reach Python intact on this machine, from a freshly built extension.

    python bench/extension_errors.py

On the H200 machine's image (torch 2.11.0+cu130, Ubuntu g++ 13.3; 2026-11-30) a TORCH_CHECK_VALUE
thrown from a five-line extension killed the process with SIGSEGV while a std::runtime_error came
through as RuntimeError; our kernels' argument checks (ValueError) crashed the same way, whether
thrown as c10::ValueError or std::invalid_argument. This prints, for one minimal extension and
for our two real ones, what each kind of throw becomes: a Python exception, or the signal that
killed the calling process (each call runs in its own subprocess).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap

SOURCE = textwrap.dedent("""
    #include <torch/extension.h>
    #include <stdexcept>
    void c10_value_error() { TORCH_CHECK_VALUE(false, "c10::ValueError"); }
    void c10_error() { TORCH_CHECK(false, "c10::Error"); }
    void std_invalid_argument() { throw std::invalid_argument("std::invalid_argument"); }
    void std_runtime_error() { throw std::runtime_error("std::runtime_error"); }
    void std_out_of_range() { throw std::out_of_range("std::out_of_range"); }
    void pybind_value_error() { throw pybind11::value_error("pybind11::value_error"); }
    void error_already_set() {
      PyErr_SetString(PyExc_ValueError, "PyErr_SetString + error_already_set");
      throw pybind11::error_already_set();
    }
    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
      m.def("c10_value_error", &c10_value_error); m.def("c10_error", &c10_error);
      m.def("std_invalid_argument", &std_invalid_argument);
      m.def("std_runtime_error", &std_runtime_error);
      m.def("std_out_of_range", &std_out_of_range);
      m.def("pybind_value_error", &pybind_value_error);
      m.def("error_already_set", &error_already_set);
    }
""")
THROWS = ("c10_value_error", "c10_error", "std_invalid_argument", "std_runtime_error",
          "std_out_of_range", "pybind_value_error", "error_already_set")
# our extensions' argument checks: a block table entry of -1, prefill seq_lens not summing to T
REAL = {
    "attention kernel, block -1": (
        "from services.attention_cpu import kernel\n"
        "kernel.paged_attention(torch.randn(1, 2, 16), torch.randn(4, 2, 8, 16),"
        " torch.randn(4, 2, 8, 16), torch.tensor([[-1]], dtype=torch.int32),"
        " torch.tensor([5], dtype=torch.int32), 0.25)"),
    "panel prefill, bad seq_lens": (
        "from moelens import panel_gemm\n"
        "x = torch.randn(4, 2, 16)\npanel_gemm.causal_attention(x, x, x, [3], 0.25)"),
}


def outcome(code: str) -> str:
    wrapped = f"import torch\ntry:\n{textwrap.indent(code, '    ')}\n    print('no error')\n" \
              "except Exception as e:\n    print(type(e).__name__)"
    run = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True,
                         timeout=600)
    return run.stdout.strip() if run.returncode == 0 else f"died (exit {run.returncode})"


def main() -> int:
    import torch
    from torch.utils import cpp_extension

    build = tempfile.mkdtemp(prefix="moelens_errors_")
    cpp_extension.load_inline("moelens_errors", SOURCE, build_directory=build)
    load = ("import importlib.util as u\n"
            f"s = u.spec_from_file_location('moelens_errors', '{build}/moelens_errors.so')\n"
            "m = u.module_from_spec(s)\ns.loader.exec_module(m)\n")
    print(f"torch {torch.__version__}; "
          + subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout
          .splitlines()[0])
    for name in THROWS:
        print(f"{name:28s} -> {outcome(load + f'm.{name}()')}")
    for name, code in REAL.items():
        print(f"{name:28s} -> {outcome(code)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
