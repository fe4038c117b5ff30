"""ZOO.yaml: which models, which recipes, which params, and where each result goes.

    models: ["zoo/**/*.keras", {path: zoo/big.keras, params: {factor: 0.3}}]
    recipes: [recipes/prep.recipe]
    output: "out/{model}/{recipe}-{params}.keras"
    seed: 0
    params: {factor: [0.5, 0.8]}
    imports: [mylayers]      # modules that register custom layers (as apply's --import)
    unsafe: false            # true: models with Lambda layers may load (as apply's --unsafe)

Everything is checked before any job runs, without TensorFlow: the file's shape (unknown keys, wrong
types), that every model path exists and every glob matches, that the recipes compile, that every
param is declared by a recipe and has the right type, and that the output template gives every job its
own path inside the output folder. All problems are reported at once, each with its line and column.

A batch file may come from someone else (CI on a pull request): its recipes are quoted in an error only
when they read as recipe text, and under the include root (--include-root, $MODELXFORM_INCLUDE_ROOT) its
recipes, models and outputs must be inside the root and its `imports` and `unsafe: true` are refused
unless the command line gives them (docs/batch.md, docs/robustness.md).
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import itertools
import math
import os
import string
from dataclasses import dataclass, field

import yaml

from ..errors import Diagnostic, ModelxformError, UsageError
from ..lang.yaml_nodes import NodeReader
from ..source import Source

TOP_KEYS = {"models": True, "recipes": True, "output": True, "seed": False, "params": False, "imports": False,
            "unsafe": False}
MODEL_KEYS = {"path": True, "params": False}
TEMPLATE_FIELDS = ("model", "recipe", "params")
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
_SCALAR_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")}


class ZooError(UsageError):
    """A ZOO.yaml that cannot be run (exit status 2); nothing has been run or written."""


@dataclass(frozen=True)
class Job:
    """One model × recipe × params combination and the file it writes."""

    index: int
    model: str  # absolute path
    recipe: str  # absolute path
    params: dict  # the overrides for this job (values as YAML gives them), sorted by name
    params_text: str  # "factor=0.5-rate=0.1", as {params} renders it
    seed: int | None
    output: str  # absolute path
    model_name: str  # paths as shown to the user (relative to ZOO.yaml's folder when inside it)
    recipe_name: str
    output_name: str
    imports: tuple = ()  # modules registering custom layers, imported before the model is loaded
    unsafe: bool = False  # load with Keras safe mode off (Lambda layers)
    import_root: str = ""  # ZOO.yaml's folder: where `imports` are looked for first
    include_root: str | None = None  # --include-root: the folder the recipes may include files from

    def payload(self, kind: str = "apply") -> dict:
        """What a worker needs to run the job: plain data, so it pickles for processes and Ray."""
        env = {k: os.environ[k] for k in ("SOURCE_DATE_EPOCH",) if k in os.environ}
        return {"index": self.index, "kind": kind, "model": self.model, "recipe": self.recipe,
                "params": dict(self.params), "seed": self.seed, "output": self.output, "env": env,
                "imports": list(self.imports), "unsafe": self.unsafe, "import_root": self.import_root,
                "include_root": self.include_root}


@dataclass
class Zoo:
    path: str
    root: str  # the folder of ZOO.yaml: every relative path is taken from here
    output_folder: str
    template: str
    jobs: list[Job] = field(default_factory=list)
    recipes: dict = field(default_factory=dict)  # absolute path -> compiled Recipe
    models: list[str] = field(default_factory=list)  # absolute paths, in job order


@dataclass
class _Model:
    path: str
    params: dict  # name -> (value, text, node)
    node: object


class _Reader(NodeReader):
    def __init__(self, source: Source, root: str):
        super().__init__(source)
        self.root = root
        self._loader = yaml.SafeLoader("")

    mapping = NodeReader.keyed

    def string(self, node, what: str) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str" and node.value != "":
            return node.value
        self.error(node, f"{what} must be a non-empty string")
        return None

    def sequence(self, node, what: str, example: str) -> list:
        """A list; a single string is taken as a list of one (``recipes: prep.recipe``)."""
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            return [node]
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.error(node, f"{what} must be a non-empty list, e.g. {example}")
            return []
        return list(node.value)

    def scalar_value(self, node, what: str):
        """(value, text) of a param value: a number, string, true/false or null."""
        if not isinstance(node, yaml.ScalarNode) or node.tag not in _SCALAR_TAGS:
            self.error(node, f"{what} must be a number, a string, true/false or null")
            return None
        try:
            value = self._loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.error(node, f"{what}: not a value: {exc}")
            return None
        if isinstance(value, float) and not math.isfinite(value):  # (.nan, .inf, 1.0e400: --param refuses them)
            self.error(node, f"{what} must be a finite number, not {node.value}")
            return None
        return value, node.value

    # -- paths -------------------------------------------------------------------------------------
    def absolute(self, text: str) -> str:
        return os.path.normpath(os.path.join(self.root, os.path.expanduser(text)))

    def shown(self, path: str) -> str:
        rel = os.path.relpath(path, self.root)
        return path if rel == ".." or rel.startswith(".." + os.sep) else rel


def _compose(source: Source):
    """The YAML node tree, read with the safe loader's composer: no anchors, aliases or tags (the
    recipe reader's rules and limits, yaml_form.compose), with its messages speaking of batch files."""
    from ..errors import RecipeError
    from ..lang.yaml_form import compose
    try:
        return compose(source)
    except RecipeError as exc:
        def reword(message: str) -> str:
            return message.replace("in recipes", "in batch files").replace("YAML recipe", "the batch file") \
                .replace("recipe is larger", "the batch file is larger")
        diagnostics = [Diagnostic(reword(d.message), d.span, d.source, d.hint) for d in exc.diagnostics]
        raise ZooError(diagnostics[0].message, diagnostics=diagnostics) from None


def load_zoo(path: str | os.PathLike, *, include_root: str | None = None, imports=(), unsafe: bool = False) -> Zoo:
    """Read and check a ZOO.yaml; raises ZooError (all problems at once) or returns the jobs.
    ``include_root`` (else $MODELXFORM_INCLUDE_ROOT): the folder the batch file's recipes, what they
    include and load weights from, its models and its outputs must be inside (symbolic links resolved);
    and then the batch file may not ask for ``imports`` or ``unsafe: true`` unless the caller does too.
    ``imports``, ``unsafe``: what the command line gives (``batch --import MODULE``, ``--unsafe``).

    >>> zoo = load_zoo("zoo.yaml")          # doctest: +SKIP
    >>> [job.output_name for job in zoo.jobs]  # doctest: +SKIP
    ['out/cnn/prep-factor=0.5.keras', 'out/cnn/prep-factor=0.8.keras']
    """
    from ..lang.files import ReadRefused, read_bounded
    from ..lang.parser import MAX_RECIPE_BYTES
    path = os.fspath(path)
    try:
        data = read_bounded(path, MAX_RECIPE_BYTES)  # a regular file, checked before it is read
        text = data.decode("utf-8")
    except ReadRefused as exc:
        if exc.kind == "directory":
            raise ZooError(f"{path}: is a directory, not a batch file") from None
        raise ZooError(f"{path}: {exc.reason}" + (", not a batch file" if exc.kind == "special" else "")) from None
    except UnicodeDecodeError as exc:
        raise ZooError(f"{path}: is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                       f"{exc.start})") from None
    from ..lang.compiler import INCLUDE_ROOT_ENV, include_root_from
    confine = include_root_from(include_root)
    cli_imports, cli_unsafe = list(dict.fromkeys(imports)), bool(unsafe)
    source = Source(text, path)
    root_node = _compose(source)
    root = os.path.dirname(os.path.abspath(path))
    reader = _Reader(source, root)
    zoo = Zoo(path=path, root=root, output_folder=root, template="")
    if root_node is None:
        reader.error(None, "the batch file is empty; it needs models, recipes and output")
        raise ZooError(reader.errors[0].message, diagnostics=reader.errors)
    top = reader.mapping(root_node, "the batch file", TOP_KEYS)
    if top is None:
        raise ZooError(reader.errors[0].message, diagnostics=reader.errors)

    template_node = top.get("output", (None, None))[1]
    template = reader.string(template_node, "output") if template_node is not None else None
    if template is not None:
        _check_template(reader, template, template_node, zoo)

    seed = None
    if "seed" in top:
        node = top["seed"][1]
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:int":
            seed = int(reader._loader.construct_object(node))
            if seed < 0:
                reader.error(node, "seed must be a whole number ≥ 0")
        else:
            reader.error(node, "seed must be a whole number ≥ 0")

    unsafe = False
    if "unsafe" in top:
        node = top["unsafe"][1]
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:bool":
            unsafe = bool(reader._loader.construct_object(node))
            if unsafe and confine is not None and not cli_unsafe:
                reader.error(node, f"unsafe: true would turn Keras safe mode off, which a batch file may not ask for "
                                   f"under --include-root (or ${INCLUDE_ROOT_ENV}); if you trust these models, "
                                   "pass --unsafe")
        else:
            reader.error(node, "unsafe must be true or false")
    imports: list[str] = []
    if "imports" in top:
        for item in reader.sequence(top["imports"][1], "imports", "[mylayers]"):
            name = reader.string(item, "an entry of imports")
            if name is not None and not all(part.isidentifier() for part in name.split(".")):
                reader.error(item, f"imports: {name!r} is not a module name (a dotted name such as "
                                   "mypackage.layers)")
            elif name is not None and confine is not None and name not in cli_imports:
                reader.error(item, f"imports: {name!r} would run Python code, which a batch file may not ask for "
                                   f"under --include-root (or ${INCLUDE_ROOT_ENV}); if you trust that module, "
                                   f"pass --import {name}")
            elif name is not None:
                imports.append(name)

    matrix = {}  # name -> [(value, text, node)]
    matrix_keys = {}
    if "params" in top:
        node = top["params"][1]
        if not isinstance(node, yaml.MappingNode):
            reader.error(node, "params must be a mapping of parameter name to a list of values, "
                               "e.g. {factor: [0.5, 0.8]}")
        else:
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(name, str) or not name.isidentifier():
                    reader.error(key_node, "a parameter name is a plain word, e.g. factor")
                    continue
                if name in matrix:
                    reader.error(key_node, f"parameter {name!r} is given twice in params")
                    continue
                if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
                    reader.error(value_node, f"params: {name} must be a non-empty list of values, "
                                             f"e.g. {name}: [0.5, 0.8]")
                    continue
                values = []
                for item in value_node.value:
                    got = reader.scalar_value(item, f"a value of {name}")
                    if got is not None:
                        values.append((got[0], got[1], item))
                matrix[name] = values
                matrix_keys[name] = key_node

    models = _read_models(reader, top.get("models", (None, None))[1], zoo, confine) if "models" in top else []
    recipes = _read_recipes(reader, top.get("recipes", (None, None))[1], include_root, confine) \
        if "recipes" in top else {}
    zoo.recipes = {p: r for p, (r, _) in recipes.items() if r is not None}

    if reader.errors or template is None:
        raise ZooError(reader.errors[0].message, diagnostics=reader.errors)
    _check_params(reader, matrix, matrix_keys, models, recipes)
    if reader.errors:
        raise ZooError(reader.errors[0].message, diagnostics=reader.errors)
    _expand(reader, zoo, models, recipes, matrix, seed, template, template_node, confine)
    if reader.errors:
        raise ZooError(reader.errors[0].message, diagnostics=reader.errors)
    # The command line's modules are found where apply's --import finds them; the batch file's own,
    # in its folder first (docs/batch.md) — but not under the include root, where that folder may be a
    # pull request's: there a module the batch file names is imported only because the command line
    # names it too, and from where the command line's are.
    everything = tuple(dict.fromkeys(imports + cli_imports))
    unsafe = unsafe or cli_unsafe
    if everything or unsafe or include_root is not None:
        zoo.jobs = [dataclasses.replace(job, imports=everything, unsafe=unsafe,
                                        import_root=root if imports and confine is None else "",
                                        include_root=include_root) for job in zoo.jobs]
    return zoo


def _check_template(reader: _Reader, template: str, node, zoo: Zoo) -> None:
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        reader.error(node, f"output: {exc} (write {{{{ and }}}} for literal braces)")
        return
    literal_prefix, seen_field = "", False
    for literal, name, spec, conversion in parts:
        if not seen_field:
            literal_prefix += literal
        if name is None:
            continue
        seen_field = True
        if name not in TEMPLATE_FIELDS:
            guess = difflib.get_close_matches(name, TEMPLATE_FIELDS, n=1)
            reader.error(node, f"output: unknown field {{{name}}}"
                         + (f" (did you mean {{{guess[0]}}}?)" if guess else "")
                         + "; the fields are {model}, {recipe} and {params}")
        elif spec or conversion:
            reader.error(node, f"output: {{{name}}} takes no format or conversion")
    if os.path.isabs(os.path.expanduser(template)):
        reader.error(node, "output must be a path relative to the batch file's folder, not an absolute path")
        return
    if ".." in template.replace("\\", "/").split("/"):
        reader.error(node, "output must not contain '..': results stay inside the output folder")
        return
    if not template.lower().endswith(MODEL_SUFFIXES):
        reader.error(node, "output must end in .keras or .h5 (the format of the results)")
    # The output folder is the template's fixed leading folders: every result must stay inside it.
    folder = literal_prefix.replace("\\", "/").rpartition("/")[0] if seen_field else \
        template.replace("\\", "/").rpartition("/")[0]
    zoo.output_folder = reader.absolute(folder) if folder else reader.root
    zoo.template = template


def _is_inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _read_models(reader: _Reader, node, zoo: Zoo, confine=None) -> list[_Model]:
    items = reader.sequence(node, "models", '["zoo/**/*.keras"]')
    explicit: dict[str, object] = {}  # path -> the node that names it
    from_globs: dict[str, _Model] = {}
    ordered: list[_Model] = []
    for item in items:
        params: dict = {}
        path_node = item
        if isinstance(item, yaml.MappingNode):
            fields = reader.mapping(item, "a model entry", MODEL_KEYS)
            if not fields or "path" not in fields:
                continue
            path_node = fields["path"][1]
            if "params" in fields:
                pnode = fields["params"][1]
                if not isinstance(pnode, yaml.MappingNode):
                    reader.error(pnode, "a model's params must be a mapping, e.g. {factor: 0.3}")
                else:
                    for key_node, value_node in pnode.value:
                        name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                        if not isinstance(name, str) or not name.isidentifier():
                            reader.error(key_node, "a parameter name is a plain word, e.g. factor")
                            continue
                        if name in params:
                            reader.error(key_node, f"parameter {name!r} is given twice")
                            continue
                        got = reader.scalar_value(value_node, f"the value of {name}")
                        if got is not None:
                            params[name] = (got[0], got[1], key_node)
        text = reader.string(path_node, "a model path")
        if text is None:
            continue
        pattern = reader.absolute(text)
        if glob.has_magic(text):
            matches, in_output = [], 0
            for found in sorted(walk_glob(pattern)):
                found = os.path.normpath(found)
                if not os.path.isfile(found) or not found.lower().endswith(MODEL_SUFFIXES):
                    continue
                # results of a batch are not its inputs: a rerun must not pick up last run's outputs
                if zoo.output_folder != reader.root and _is_inside(found, zoo.output_folder):
                    in_output += 1
                    continue
                matches.append(found)
            outside = [found for found in matches if confine is not None and not _is_confined(found, confine)]
            if outside:
                reader.error(path_node, _outside_message("model", text, True, len(outside), confine),
                             hint=CONFINED_HINT)
                continue
            if not matches:
                extra = f" ({in_output} in the output folder are not taken as inputs)" if in_output else ""
                reader.error(path_node, f"{text!r} matches no .keras or .h5 file{extra}")
                continue
            for found in matches:
                if found in explicit:
                    continue  # a file named on its own keeps its own entry
                previous = from_globs.get(found)
                if previous is not None:
                    if _plain(previous.params) != _plain(params):
                        reader.error(path_node, f"{reader.shown(found)} is matched again, with other params "
                                                "(name it on its own to give it its own params)")
                    continue
                model = _Model(found, params, path_node)
                from_globs[found] = model
                ordered.append(model)
        else:
            if confine is not None and not _is_confined(pattern, confine):  # (nothing of it looked at)
                reader.error(path_node, _outside_message("model", text, False, 1, confine), hint=CONFINED_HINT)
                continue
            if not os.path.isfile(pattern):
                reader.error(path_node, f"model {text!r} does not exist"
                             + ("" if not os.path.exists(pattern) else " as a file"))
                continue
            if not pattern.lower().endswith(MODEL_SUFFIXES):
                reader.error(path_node, f"model {text!r} is not a .keras or .h5 file")
                continue
            if pattern in explicit:
                reader.error(path_node, f"model {text!r} is listed twice")
                continue
            explicit[pattern] = path_node
            model = _Model(pattern, params, path_node)
            if pattern in from_globs:  # an earlier glob matched it: this entry replaces that one
                ordered[ordered.index(from_globs.pop(pattern))] = model
            else:
                ordered.append(model)
    return ordered


CONFINED_HINT = ("with --include-root (or $MODELXFORM_INCLUDE_ROOT) the recipes and models a batch file names, "
                 "and its outputs, are confined to that folder")


def _is_confined(path: str, confine) -> bool:
    """Whether ``path`` is inside the include root, symbolic links resolved (as includes are checked)."""
    import pathlib
    return pathlib.Path(path).resolve().is_relative_to(confine)


def _outside_message(what: str, text: str, magic: bool, count: int, confine) -> str:
    """(the files a glob matches outside the root are counted, not named)"""
    if magic:
        return f"{text!r} matches {count} file{'s' if count > 1 else ''} outside the include root {confine}"
    return f"{what} {text!r} is outside the include root {confine}"


def _plain(params: dict) -> dict:
    return {k: v[1] for k, v in params.items()}


def _read_recipes(reader: _Reader, node, include_root=None, confine=None) -> dict:
    """absolute path -> (Recipe or None, node). ``confine``: the include root, which every recipe must
    be inside (symbolic links resolved; nothing outside is read)."""
    out: dict = {}
    for item in reader.sequence(node, "recipes", '["recipes/prep.recipe"]'):
        text = reader.string(item, "a recipe path")
        if text is None:
            continue
        pattern = reader.absolute(text)
        magic = glob.has_magic(text)
        paths = sorted(os.path.normpath(p) for p in walk_glob(pattern) if os.path.isfile(p)) \
            if magic else [pattern]
        if confine is not None:
            outside = [p for p in paths if not _is_confined(p, confine)]
            if outside:
                reader.error(item, _outside_message("recipe", text, magic, len(outside), confine), hint=CONFINED_HINT)
                for p in outside:
                    out.setdefault(p, (None, item))
                continue
        if not paths:
            reader.error(item, f"{text!r} matches no recipe file")
        for p in paths:
            if p in out:
                reader.error(item, f"recipe {reader.shown(p)} is listed twice")
                continue
            out[p] = (_read_recipe(reader, p, reader.shown(p) if magic else text, item, include_root), item)
    return out


def walk_glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, but each folder is walked once: a symbolic link to a folder
    already walked (a loop such as ``ln -s . self``) is not followed again. glob.glob follows every link,
    so two such loops in a zoo's folder made ``models: ["**/*.keras"]`` walk without end (2 GB after ten
    minutes). As glob does, ``*`` and ``**`` match no name that starts with a dot, and the paths found are
    built from the pattern's own folders (relative where it is)."""
    import fnmatch
    parts = pattern.split(os.sep)
    first = next((i for i, part in enumerate(parts) if glob.has_magic(part)), None)
    if first is None:
        return [pattern] if os.path.lexists(pattern) else []
    base = os.sep.join(parts[:first]) or (os.sep if pattern.startswith(os.sep) else os.curdir)
    walked: set = set()
    found: list = []

    def names(folder):
        try:
            with os.scandir(folder) as entries:
                return sorted(entry.name for entry in entries)
        except OSError:
            return []

    def once(folder) -> bool:
        try:
            st = os.stat(folder)
        except OSError:
            return False
        key = (st.st_dev, st.st_ino)
        if key in walked:
            return False
        walked.add(key)
        return True

    def join(folder, name):
        return name if folder == os.curdir and not pattern.startswith(os.curdir) else os.path.join(folder, name)

    def match(folder, rest):
        if not rest:
            found.append(folder)
            return
        head, tail = rest[0], rest[1:]
        if head == "**":
            match(folder, tail)  # (no folder)
            for name in names(folder):
                path = join(folder, name)
                if name.startswith("."):
                    continue
                if os.path.isdir(path):
                    if once(path):
                        match(path, rest)
                elif not tail:  # (a trailing ** matches files too)
                    found.append(path)
        elif glob.has_magic(head):
            for name in names(folder):
                if (head.startswith(".") or not name.startswith(".")) and fnmatch.fnmatchcase(name, head):
                    match(join(folder, name), tail)
        else:
            path = join(folder, head)
            if (os.path.isdir(path) if tail else os.path.lexists(path)):
                match(path, tail)
    if once(base):
        match(base, parts[first:])
    return found


def _read_recipe(reader: _Reader, path: str, name: str, item, include_root):
    """A recipe the batch file names, compiled, or None with the errors added. The batch file may come
    from someone else, so the file is held to an included file's rule (compiler.compile_recipe): a
    regular file of at most MAX_RECIPE_BYTES, read only then, and quoted in an error only when it reads
    as recipe text; otherwise the error is at the batch file's entry and quotes none of the file."""
    from ..errors import RecipeError
    from ..lang.compiler import compile_recipe
    from ..lang.files import ReadRefused, read_bounded
    from ..lang.parser import MAX_RECIPE_BYTES
    try:
        data = read_bounded(path, MAX_RECIPE_BYTES)
    except ReadRefused as exc:
        if exc.kind == "missing":
            reader.error(item, f"recipe {name!r} does not exist")
        elif exc.kind in ("directory", "special"):
            reader.error(item, f"recipe {name!r} {exc.reason}, not a recipe file")
        elif exc.kind == "too-large":
            reader.error(item, f"recipe {name!r} {exc.reason}")
        else:
            reader.error(item, f"recipe {name!r}: {exc.reason}")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # (no byte or position of a file that is not text)
        reader.error(item, f"recipe {name!r} is not valid UTF-8 text")
        return None
    try:
        return compile_recipe(text, path, include_root=include_root, foreign=True)
    except RecipeError as exc:
        reason = getattr(exc, "not_recipe_text", None)
        if reason:  # not recipe text: say where it stopped reading as one, quote nothing of it
            where_in = f" at line {exc.line}, column {exc.column}" if exc.line else ""
            reader.error(item, f"recipe {name!r} is not a recipe ({reason}{where_in})",
                         hint=f"to see the error, check it on its own: modelxform check {reader.shown(path)}")
            return None
        reader.errors.extend(exc.diagnostics)  # the recipe's own errors, each with its file, line and column
        return None


def _check_params(reader: _Reader, matrix: dict, matrix_keys: dict, models: list[_Model], recipes: dict) -> None:
    """Every param must be declared by some recipe, and each value must suit each recipe declaring it."""
    from ..engine.plan import resolve_params
    compiled = [(p, r) for p, (r, _) in recipes.items() if r is not None]

    def check(name, value, node):
        declaring = [(p, r) for p, r in compiled if name in r.params]
        if not declaring:
            known = sorted({k for _, r in compiled for k in r.params})
            guess = difflib.get_close_matches(name, known, n=1)
            reader.error(node, f"parameter {name!r} is declared by none of the recipes"
                         + (f" (did you mean {guess[0]!r}?)" if guess else
                            f"; they declare: {', '.join(known) or 'none'}"))
            return
        for p, recipe in declaring:
            try:
                resolve_params(recipe, {name: value})
            except ModelxformError as exc:
                message = exc.message.replace(f" (--param {name}=…)", "")
                reader.error(node, f"{reader.shown(p)}: {message}".replace("--param gave", "the batch file gives"))
                return

    for name, values in matrix.items():
        if not any(name in r.params for _, r in compiled):
            check(name, None, matrix_keys[name])
            continue
        for value, _text, node in values:
            check(name, value, node)
    for model in models:
        for name, (value, _text, node) in model.params.items():
            check(name, value, node)


def _expand(reader: _Reader, zoo: Zoo, models: list[_Model], recipes: dict, matrix: dict, seed,
            template: str, template_node, confine=None) -> None:
    from ..engine.plan import Params, effective_seed, resolve_params
    from ..keras_io.outputs import same_file
    from ..lang.compiler import files_read
    inputs = {m.path for m in models}
    reads: dict[str, list] = {}  # recipe path -> the files it is read from (files_read)
    seen: dict[str, Job] = {}
    duplicates = 0
    for model in models:
        zoo.models.append(model.path)
        for recipe_path, (recipe, _node) in recipes.items():
            declared = recipe.params
            fixed = {k: v for k, v in model.params.items() if k in declared}
            varying = [k for k in matrix if k in declared and k not in fixed]
            for combo in itertools.product(*(matrix[k] for k in varying)):
                chosen = dict(fixed)
                chosen.update({k: c for k, c in zip(varying, combo)})
                names = sorted(chosen)
                params = {k: chosen[k][0] for k in names}
                params_text = "-".join(f"{k}={chosen[k][1]}" for k in names)
                try:
                    effective_seed(recipe, seed, Params(resolve_params(recipe, params)))
                except ModelxformError as exc:
                    reader.error(template_node, f"{reader.shown(recipe_path)}: {exc.message}")
                    return
                stem = os.path.splitext(os.path.basename(model.path))[0]
                recipe_stem = os.path.splitext(os.path.basename(recipe_path))[0]
                rendered = template.format(model=stem, recipe=recipe_stem, params=params_text)
                output = reader.absolute(rendered)
                what = f"{reader.shown(model.path)} × {reader.shown(recipe_path)}" + \
                    (f" ({params_text})" if params_text else "")
                if os.path.isabs(rendered) or not _is_inside(output, zoo.output_folder) or \
                        ".." in rendered.replace("\\", "/").split("/"):
                    reader.error(template_node, f"output {rendered!r} for {what} would leave the output folder "
                                                f"{reader.shown(zoo.output_folder)}")
                    continue
                if not output.lower().endswith(MODEL_SUFFIXES):
                    reader.error(template_node, f"output {rendered!r} for {what} does not end in .keras or .h5")
                    continue
                if output in inputs:
                    reader.error(template_node, f"output {rendered!r} for {what} is one of the input models")
                    continue
                if recipe_path not in reads:
                    reads[recipe_path] = [path for path, _ in files_read(recipe)]
                read = [path for path in reads[recipe_path] if same_file(output, path)]
                if read:  # (a file its recipe includes or loads weights from)
                    reader.error(template_node, f"output {rendered!r} for {what} is a file its recipe reads "
                                                f"({reader.shown(read[0])})")
                    continue
                if confine is not None and not _is_confined(os.path.dirname(output), confine):
                    # (a folder on the way that is a symbolic link to elsewhere)
                    reader.error(template_node, f"output {rendered!r} for {what} is outside the include root "
                                                f"{confine}", hint=CONFINED_HINT)
                    continue
                job = Job(index=len(zoo.jobs), model=model.path, recipe=recipe_path, params=params,
                          params_text=params_text, seed=seed, output=output, model_name=reader.shown(model.path),
                          recipe_name=reader.shown(recipe_path), output_name=reader.shown(output))
                if output in seen:
                    first = seen[output]
                    duplicates += 1
                    if duplicates <= 5:
                        reader.error(template_node, f"two jobs would write {reader.shown(output)}: "
                                     f"{_describe(first)} and {what}",
                                     hint="every job needs its own output: use {model}, {recipe} and {params} "
                                          "in the template")
                    continue
                seen[output] = job
                zoo.jobs.append(job)
    if duplicates > 5:
        reader.error(template_node, f"… and {duplicates - 5} more jobs whose output is not distinct")


def _describe(job: Job) -> str:
    return f"{job.model_name} × {job.recipe_name}" + (f" ({job.params_text})" if job.params_text else "")
