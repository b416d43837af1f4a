"""keras_gemma.convert imports nothing from keras_gemma.models (DESIGN.md: dependencies
point one way, models -> convert; a loader is handed the class it builds).

Read with `ast`, without importing anything: every `import` and `from ... import` of
every module under keras_gemma/convert, at module level or inside a function, relative
imports resolved."""

import ast
import pathlib

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2] / "keras_gemma"
CONVERT = PACKAGE_ROOT / "convert"
MODELS = "keras_gemma.models"


def is_models(name):
    return name == MODELS or name.startswith(MODELS + ".")


def package_of(path):
    """The dotted package a module file belongs to (its own name for an `__init__.py`)."""
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1])


def imported_from(node, package):
    """The absolute module a `from ... import` reads from."""
    if not node.level:
        return node.module
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def reexported_model_names():
    """Names keras_gemma/__init__.py takes from keras_gemma.models (GemmaBackbone, ...):
    `from keras_gemma import GemmaBackbone` reaches models/ too."""
    tree = ast.parse((PACKAGE_ROOT / "__init__.py").read_text(encoding="utf-8"))
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and is_models(node.module)
        for alias in node.names
    }


def models_imports(source, package, model_names):
    """`(line, statement)` of each import of keras_gemma.models in `source`, the code
    of a module of `package`."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad = any(is_models(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = imported_from(node, package)
            bad = is_models(module) or any(
                is_models(f"{module}.{alias.name}")
                or (module == "keras_gemma" and alias.name in model_names)
                for alias in node.names
            )
        else:
            continue
        if bad:
            found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_convert_imports_nothing_from_models():
    modules = sorted(CONVERT.rglob("*.py"))
    assert CONVERT / "__init__.py" in modules
    model_names = reexported_model_names()
    assert "GemmaBackbone" in model_names
    problems = [
        f"{path.relative_to(PACKAGE_ROOT.parent)}:{line}: {statement}"
        for path in modules
        for line, statement in models_imports(
            path.read_text(encoding="utf-8"), package_of(path), model_names
        )
    ]
    assert not problems, "keras_gemma.convert imports keras_gemma.models:\n" + "\n".join(problems)


def test_the_check_sees_every_spelling():
    """Each way of reaching models/ from a convert module is caught, with its line."""
    spellings = [
        "import keras_gemma.models",
        "import keras_gemma.models.gemma_backbone as backbone",
        "from keras_gemma.models.gemma_backbone import GemmaBackbone",
        "from keras_gemma import models",
        "from keras_gemma import GemmaBackbone",
        "from .. import models",
        "from ..models import gemma_backbone",
        "from ..models.gemma_tokenizer import GemmaTokenizer",
        "def inside():\n    from keras_gemma.models.gemma_backbone import GemmaBackbone",
    ]
    allowed = [
        "from keras_gemma import presets",
        "from . import gguf_file",
        "from .safetensors import SafetensorsFile",
        "from keras_gemma.convert.weights import weight_map",
    ]
    model_names = reexported_model_names()
    for source in spellings + allowed:
        found = models_imports("import os\n" + source + "\n", "keras_gemma.convert", model_names)
        assert bool(found) == (source in spellings), source
        if found:
            assert found[0][0] == 2 + source.count("\n"), source
