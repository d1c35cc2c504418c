"""tierflow's layering (DESIGN.md section 2), checked on its source by tests/layering.py.

The checker is first shown to catch each kind of violation in a small fake package built in a
temporary directory -- among them the four upward imports tierflow had before it was split into
layers -- and then run on tierflow itself, which must have none. See tests/layering.py for the
rules and why they are what they are; in short, beyond the ranks of DESIGN.md: layers of one rank
do not import each other (stages and convert, pipeline and adapters -- none does today, and
adapters get what they need from the pipeline, such as a tracer, passed in), except the engine
reading its config; a root module outside the public surface is an error and ranks as engine;
``tiers.plan`` and ``pipeline.batcher`` import only an allow-list of pure standard-library modules.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from layering import (Violation, check_exceptions, check_layers, check_package, check_purity, check_root,
                      load_package, module_imports)

SOURCE_ROOT = Path(__file__).resolve().parents[1]

# A fake tierflow that follows every rule; each test changes a file or two of it.
CLEAN = {
    "__init__.py": "from tierflow.engine.api import Engine\nfrom tierflow.config import EngineConfig\n",
    "config.py": "from dataclasses import dataclass\n\nfrom tierflow.errors import ConfigError\n",
    "errors.py": "class TierflowError(Exception):\n    pass\n\n\n"
                 "class ConfigError(TierflowError, ValueError):\n    pass\n",
    "outputs.py": "from dataclasses import dataclass\n",
    "testing.py": "import torch\n\nfrom tierflow.engine.api import Engine\n",
    "pipeline/__init__.py": "",
    "pipeline/ring.py": "from collections import deque\n",
    "pipeline/batcher.py": "from collections import deque\nfrom dataclasses import dataclass\n\n"
                           "from tierflow.errors import ConfigError\n",
    "adapters/__init__.py": "from tierflow.adapters.base import ModelSpec\n",
    "adapters/base.py": "import math\n\nimport torch\n\nfrom tierflow.errors import ConfigError\n",
    "tiers/__init__.py": "",
    "tiers/kv/__init__.py": "",
    "tiers/kv/paged.py": "import os\n\nimport torch\n\nfrom tierflow.pipeline.ring import deque\n"
                         "from tierflow.tiers.plan.plan import TierPlan\n",
    "tiers/plan/__init__.py": "",
    "tiers/plan/plan.py": "import math\nfrom dataclasses import dataclass\nfrom typing import Mapping\n\n"
                          "from tierflow.errors import ConfigError\nfrom . import costs\n",
    "tiers/plan/costs.py": "from __future__ import annotations\n\nimport re\n",
    "tiers/probe/__init__.py": "",
    "tiers/probe/probe.py": "import json\nimport tempfile\n\nfrom tierflow.tiers.plan.plan import TierPlan\n",
    "stages/__init__.py": "",
    "stages/prefix.py": "import torch\n\nfrom tierflow.adapters import ModelSpec\n"
                        "from tierflow.tiers.kv.paged import KVStore\n",
    "convert/__init__.py": "",
    "convert/demo.py": "from pathlib import Path\n\nfrom tierflow.tiers.kv import paged\n",
    "engine/__init__.py": "from tierflow.engine.api import Engine\n",
    "engine/api.py": "from tierflow.config import EngineConfig\nfrom tierflow.stages.prefix import PrefixReuse\n"
                     "from tierflow.outputs import Completion\n",
    "cli/__init__.py": "",
    "cli/main.py": "from tierflow.convert.demo import demo_model_dir\nfrom tierflow.engine.api import Engine\n",
}


def write(tmp_path: Path, files: dict[str, str]) -> Path:
    """The clean fake package with ``files`` (by path inside the package) added or replaced."""
    for rel, text in {**CLEAN, **files}.items():
        path = tmp_path / "tierflow" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def names(violations: list[Violation], rule: str, rel: str) -> list[str]:
    """The messages of ``violations`` of ``rule`` in tierflow/``rel``."""
    return [v.message for v in violations if v.rule == rule and v.path == f"tierflow/{rel}"]


def test_the_clean_fake_package_passes(tmp_path: Path) -> None:
    assert check_package(write(tmp_path, {}), "tierflow") == []


# The upward imports tierflow had before its layers, rebuilt in the fake package.
HISTORY = {
    "paged KV store read EngineConfig": (
        {"tiers/kv/paged.py": "import os\n\nfrom tierflow.config import EngineConfig\n"},
        "tiers/kv/paged.py", 3, "tierflow.config"),
    "prefix stage read EngineConfig": (
        {"stages/prefix.py": "import torch\n\nfrom tierflow.config import EngineConfig\n"},
        "stages/prefix.py", 3, "tierflow.config"),
    "probe found its cache through the demo": (
        {"tiers/probe/probe.py": "import json\n\n\ndef default_cache():\n"
                                 "    from tierflow.convert.demo import demo_model_dir\n"
                                 "    return demo_model_dir()\n"},
        "tiers/probe/probe.py", 5, "tierflow.convert.demo"),
    "device stage imported the root sweep module": (
        {"sweep.py": "from tierflow.config import EngineConfig\n",
         "stages/device.py": "import torch\n\nfrom tierflow.sweep import SweepRunner\n"},
        "stages/device.py", 3, "tierflow.sweep"),
}


@pytest.mark.parametrize("files, rel, line, target", HISTORY.values(), ids=HISTORY.keys())
def test_each_old_upward_import_is_caught(tmp_path: Path, files: dict[str, str], rel: str, line: int,
                                          target: str) -> None:
    found = [v for v in check_layers(write(tmp_path, files), "tierflow") if v.path == f"tierflow/{rel}"]
    assert [(v.line, "upward" in v.message and f"imports {target}:" in v.message) for v in found] == [(line, True)]


def test_a_root_module_outside_the_public_surface_is_caught(tmp_path: Path) -> None:
    root = write(tmp_path, {"sweep.py": "", "extras/__init__.py": "", "extras/tools.py": ""})
    found = check_root(root, "tierflow")
    assert [(v.path, "sits at the package root" in v.message) for v in found if "sweep" in v.path] == \
        [("tierflow/sweep.py", True)]
    assert [v.path for v in found if "extras" in v.path] == ["tierflow/extras/__init__.py"]
    assert len(found) == 2


SPELLINGS = {
    "from-module": "from tierflow.config import EngineConfig\n",
    "from-package": "from tierflow import config\n",
    "relative-from-package": "from .. import config\n",
    "relative-from-module": "from ..config import EngineConfig\n",
    "import": "import tierflow.config\n",
    "import-as": "import tierflow.config as cfg\n",
    "in-function": "def f():\n    import tierflow.config\n",
    "type-checking": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                     "    from tierflow.config import EngineConfig\n",
    "import-module": "import importlib\n\nconfig = importlib.import_module('tierflow.config')\n",
}


@pytest.mark.parametrize("source", SPELLINGS.values(), ids=SPELLINGS.keys())
def test_every_spelling_of_an_import_counts(tmp_path: Path, source: str) -> None:
    found = check_layers(write(tmp_path, {"stages/prefix.py": source}), "tierflow")
    assert [m for m in names(found, "layers", "stages/prefix.py") if "imports tierflow.config:" in m]


def test_relative_imports_in_a_package_init_resolve_against_the_package(tmp_path: Path) -> None:
    root = write(tmp_path, {"stages/__init__.py": "from . import prefix\nfrom ..tiers.kv import paged\n"})
    modules = load_package(root, "tierflow")
    assert [i.target for i in module_imports(modules["tierflow.stages"], modules)] == \
        ["tierflow.stages.prefix", "tierflow.tiers.kv.paged"]


SIDEWAYS = {
    "stages->convert": ("stages/prefix.py", "from tierflow.convert.demo import demo_model_dir\n"),
    "convert->stages": ("convert/demo.py", "from tierflow.stages import prefix\n"),
    "pipeline->adapters": ("pipeline/ring.py", "from tierflow.adapters.base import ModelSpec\n"),
    "adapters->pipeline": ("adapters/base.py", "from tierflow.pipeline.ring import deque\n"),
    "config->engine": ("config.py", "from tierflow.engine.api import Engine\n"),
    "testing->package-init": ("testing.py", "from tierflow import Engine\n"),
}


@pytest.mark.parametrize("rel, source", SIDEWAYS.values(), ids=SIDEWAYS.keys())
def test_layers_of_one_rank_stay_independent(tmp_path: Path, rel: str, source: str) -> None:
    found = names(check_layers(write(tmp_path, {rel: source}), "tierflow"), "layers", rel)
    assert len(found) == 1 and "share rank" in found[0]


def test_an_import_of_a_missing_module_is_caught(tmp_path: Path) -> None:
    root = write(tmp_path, {"engine/api.py": "from tierflow.tiers.kv.gone import KVStore\n"})
    found = check_layers(root, "tierflow")
    assert names(found, "layers", "engine/api.py") == ["tierflow.engine.api imports tierflow.tiers.kv.gone, "
                                                       "which is not a module of tierflow"]


IMPURE = {
    "plan imports torch": ("tiers/plan/plan.py", "import torch\n", "imports torch"),
    "plan imports os.path": ("tiers/plan/plan.py", "import os.path\n", "imports os.path"),
    "plan imports pathlib": ("tiers/plan/costs.py", "from pathlib import Path\n", "imports pathlib"),
    "plan imports the KV store": ("tiers/plan/plan.py", "from tierflow.tiers.kv.paged import KVStore\n",
                                  "imports tierflow.tiers.kv.paged, which is not"),
    "plan opens a file": ("tiers/plan/plan.py", "def f(p):\n    return open(p).read()\n", "calls open()"),
    "batcher imports json": ("pipeline/batcher.py", "import json\n", "imports json"),
    "batcher imports io in a function": ("pipeline/batcher.py", "def f():\n    import io\n", "imports io"),
    "batcher awaits": ("pipeline/batcher.py", "async def f(x):\n    return x\n", "async code"),
    "errors imports tempfile": ("errors.py", "import tempfile\n", "imports tempfile"),
}


@pytest.mark.parametrize("rel, source, expected", IMPURE.values(), ids=IMPURE.keys())
def test_pure_modules_stay_pure(tmp_path: Path, rel: str, source: str, expected: str) -> None:
    found = names(check_purity(write(tmp_path, {rel: source}), "tierflow"), "pure", rel)
    assert len(found) == 1 and expected in found[0], found


ADAPTER_IO = {
    "safetensors": ("import safetensors\n", "imports safetensors"),
    "pathlib": ("from pathlib import Path\n", "imports pathlib"),
    "os": ("import os\n", "imports os"),
    "json": ("def f(s):\n    import json\n    return json.loads(s)\n", "imports json"),
    "torch.load": ("import torch\n\n\ndef f(p):\n    return torch.load(p)\n", "calls torch.load()"),
    "open": ("def f(p):\n    return open(p)\n", "calls open()"),
}


@pytest.mark.parametrize("source, expected", ADAPTER_IO.values(), ids=ADAPTER_IO.keys())
def test_adapters_do_no_io(tmp_path: Path, source: str, expected: str) -> None:
    found = names(check_purity(write(tmp_path, {"adapters/llama.py": source}), "tierflow"), "adapters-io",
                  "adapters/llama.py")
    assert len(found) == 1 and expected in found[0], found


def test_adapters_do_not_reach_the_tiers(tmp_path: Path) -> None:
    found = check_layers(write(tmp_path, {"adapters/llama.py": "from tierflow.tiers.kv import paged\n"}), "tierflow")
    assert [m for m in names(found, "layers", "adapters/llama.py") if "upward into tiers" in m]


EXCEPTIONS = {
    "builtin base": ("class WouldBlock(Exception):\n    pass\n", ["WouldBlock"]),
    "tierflow base": ("from tierflow.errors import ConfigError\n\n\nclass PrefixError(ConfigError):\n    pass\n",
                      ["PrefixError"]),
    "base through a module alias": ("import tierflow.errors as errors\n\n\nclass E(errors.TierflowError):\n    pass\n",
                                    ["E"]),
    "base re-exported by config": ("from tierflow.config import ConfigError\n\n\nclass E(ConfigError):\n    pass\n",
                                   ["E"]),
    "chain within the module": ("class A(KeyError):\n    pass\n\n\nclass B(A):\n    pass\n", ["A", "B"]),
    "standard-library base": ("import asyncio\nfrom concurrent.futures import TimeoutError as Late\n\n\n"
                              "class A(asyncio.CancelledError):\n    pass\n\n\nclass B(Late):\n    pass\n", ["A", "B"]),
    "nested in a function": ("def f():\n    class Local(RuntimeError):\n        pass\n    return Local\n", ["Local"]),
    "third-party base named as an error": ("from gguf import GGUFReadError\n\n\nclass E(GGUFReadError):\n    pass\n",
                                           ["E"]),
    "not exceptions": ("from typing import Generic, Protocol, TypeVar\n\nimport torch\n\nT = TypeVar('T')\n\n\n"
                       "class A(Protocol):\n    pass\n\n\nclass B(Generic[T]):\n    pass\n\n\n"
                       "class C(torch.nn.Module):\n    pass\n\n\nclass D(dict, C):\n    pass\n", []),
}


@pytest.mark.parametrize("source, expected", EXCEPTIONS.values(), ids=EXCEPTIONS.keys())
def test_exceptions_live_in_errors(tmp_path: Path, source: str, expected: list[str]) -> None:
    found = check_exceptions(write(tmp_path, {"pipeline/ring.py": source}), "tierflow")
    assert all(v.path == "tierflow/pipeline/ring.py" for v in found), found
    assert sorted(v.message.partition("(")[0].removeprefix("class ") for v in found) == expected


def test_the_package_name_is_a_parameter(tmp_path: Path) -> None:
    for rel, text in {"__init__.py": "", "tiers/__init__.py": "", "tiers/store.py": "from fakeflow.engine import api\n",
                      "engine/__init__.py": "", "engine/api.py": ""}.items():
        (tmp_path / "fakeflow" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fakeflow" / rel).write_text(text)
    assert [str(v) for v in check_package(tmp_path, "fakeflow")] == [
        "fakeflow/tiers/store.py:1: [layers] fakeflow.tiers.store imports fakeflow.engine.api: "
        "layer tiers (rank 2) imports upward into engine (rank 4)"]


@pytest.mark.parametrize("check", [check_layers, check_root, check_purity, check_exceptions],
                         ids=["layers", "root", "purity", "exceptions"])
def test_tierflow_keeps_its_layers(check) -> None:
    found = check(SOURCE_ROOT, "tierflow")
    if found:
        pytest.fail(f"{len(found)} violation(s) of DESIGN.md section 2 (rules in tests/layering.py):\n"
                    + "\n".join(map(str, sorted(found, key=lambda v: (v.path, v.line)))), pytrace=False)
