"""Sphinx helpers of the xarray-zcache docs: content generated from the code at build time.

Directives (usable from MyST as ```` ```{zcache-config-table} ```` fences):

``zcache-config-table``
    The table of every ``zcache.*`` setting, generated from the YAML file of defaults
    shipped in the package (``xarray_zcache/zcache.yaml``): key, default, the matching
    `CacheConfig` field and the meaning, taken from the comment lines above each key
    (a key without comment inherits its section's; a key with neither is a build
    warning, hence an error under ``-W``).

``zcache-env-vars``
    The environment variable that sets each key (dask's ``DASK_ZCACHE__...`` rule).

``zcache-cli-help [SUBCOMMAND ...]``
    The real ``zcache [SUBCOMMAND] --help`` output, captured by running the command's
    ``main()`` in a subprocess. Without ``xarray_zcache.cli`` a note says so. If the
    command fails, the build warns, unless the directive has the ``:optional:`` flag
    (then a note says the subcommand is not available in this build).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

# -- the YAML of defaults, with its comments ---------------------------------------------------


@dataclasses.dataclass
class Setting:
    """One key of the YAML file: a section (mapping) or a leaf setting."""

    path: tuple[str, ...]
    comment: str
    is_section: bool
    value: Any
    line: int

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


_KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z0-9_.-]+):(?:\s+(?P<rest>.*))?$")


def parse_commented_yaml(text: str) -> list[Setting]:
    """Every key of a block-style YAML mapping with the comment lines just above it.

    Values come from ``yaml.safe_load`` (so flow values such as ``{}`` are parsed
    properly); the comment lines (``# ...``) directly above a key, and a trailing
    ``# ...`` on its line, are its description. A blank line ends a comment block.
    """
    data = yaml.safe_load(text) or {}
    settings: list[Setting] = []
    stack: list[tuple[int, str]] = []
    comments: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped:
            comments = []
            continue
        if stripped.startswith("#"):
            comments.append(stripped.lstrip("#").strip())
            continue
        m = _KEY_LINE.match(raw.rstrip())
        if m is None:
            comments = []
            continue
        indent = len(m["indent"].expandtabs())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*(k for _, k in stack), m["key"])
        rest = (m["rest"] or "").strip()
        trailing = ""
        if "#" in rest and not rest.startswith(("'", '"')):
            rest, _, trailing = rest.partition("#")
            rest = rest.strip()
        is_section = rest == ""
        value: Any = data
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        comment = " ".join([*comments, trailing.strip()]).strip()
        settings.append(Setting(path, comment, is_section, value, lineno))
        if is_section:
            stack.append((indent, m["key"]))
        comments = []
    return settings


def yaml_path() -> Path:
    spec = importlib.util.find_spec("xarray_zcache")
    if spec is None or spec.origin is None:
        raise RuntimeError("xarray_zcache is not importable: install the package first")
    return Path(spec.origin).with_name("zcache.yaml")


def format_default(value: Any) -> str:
    """A default as it would be written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def env_var(dotted_without_prefix: str) -> str:
    """``disk.size`` -> ``DASK_ZCACHE__DISK__SIZE`` (dask treats ``-`` and ``_`` alike)."""
    parts = ["ZCACHE", *dotted_without_prefix.split(".")]
    return "DASK_" + "__".join(p.upper().replace("-", "_") for p in parts)


# keys that config._FIELD_OF (dask key -> CacheConfig field) does not list
_SPECIAL_FIELDS = {
    "disk.path": "disk_path",
    "disk.enabled": "disk_path (None when false)",
    "decoded-array-api": "- (process-wide: zarr's codec pipeline, not a cache's setting)",
}


def config_fields() -> dict[str, str]:
    """Dask key (without ``zcache.``) -> `CacheConfig` field, from the package itself."""
    try:
        from xarray_zcache import config
    except ImportError:  # pragma: no cover - the package is installed for the docs
        return dict(_SPECIAL_FIELDS)
    return {**getattr(config, "_FIELD_OF", {}), **_SPECIAL_FIELDS}


def _balanced(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes ``text[start]`` (-1 if unbalanced)."""
    depth = 0
    quoted = False
    for i in range(start, len(text)):
        c = text[i]
        if c == '"':
            quoted = not quoted
        elif not quoted and c == open_:
            depth += 1
        elif not quoted and c == close:
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


_WORD_LITERALS = re.compile(r"\b(?:null|true|false)\b")
_CALL = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\(")


def _code_spans(text: str) -> list[tuple[int, int]]:
    """Spans of ``text`` that are code: `quoted`, "strings", {mappings}, calls(...), null."""
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(text):
        c = text[i]
        end = -1
        if c == "`":
            close = text.find("`", i + 1)
            end = -1 if close < 0 else close + 1
        elif c == '"':
            close = text.find('"', i + 1)
            quoted = text[i + 1 : close] if close > 0 else ""
            # "512MiB", "5 minutes", "lru" are values; "never expires" is prose
            if close > 0 and (" " not in quoted or quoted[:1].isdigit()):
                end = close + 1
        elif c == "{":
            end = _balanced(text, i, "{", "}")
        elif (m := _CALL.match(text, i)) and (i == 0 or not text[i - 1].isalnum()):
            end = _balanced(text, m.end() - 1, "(", ")")
        elif (m := _WORD_LITERALS.match(text, i)) and (i == 0 or not text[i - 1].isalnum()):
            end = m.end()
        if end > i:
            spans.append((i, end))
            i = end
        else:
            i += 1
    return spans


def _inline(text: str) -> list[nodes.Node]:
    """Text with its code-like parts (see `_code_spans`) as literals (no smart quotes)."""
    out: list[nodes.Node] = []
    pos = 0
    for start, end in _code_spans(text):
        if start > pos:
            out.append(nodes.Text(text[pos:start]))
        code = text[start:end].strip("`")
        out.append(nodes.literal(code, code))
        pos = end
    if pos < len(text):
        out.append(nodes.Text(text[pos:]))
    return out


def _cell(*children: nodes.Node) -> nodes.entry:
    entry = nodes.entry()
    entry += nodes.paragraph("", "", *children)
    return entry


def _table(headers: list[str], widths: list[int], rows: list[list[nodes.entry]]) -> nodes.table:
    table = nodes.table(classes=["zcache-table"])
    group = nodes.tgroup(cols=len(headers))
    table += group
    for w in widths:
        group += nodes.colspec(colwidth=w)
    head = nodes.thead()
    group += head
    hrow = nodes.row()
    for h in headers:
        hrow += _cell(nodes.Text(h))
    head += hrow
    body = nodes.tbody()
    group += body
    for cells in rows:
        row = nodes.row()
        for c in cells:
            row += c
        body += row
    return table


class _ConfigDirective(SphinxDirective):
    has_content = False

    def settings(self) -> tuple[Path, list[Setting]]:
        path = yaml_path()
        self.env.note_dependency(str(path))
        settings = parse_commented_yaml(path.read_text())
        if not settings or settings[0].path != ("zcache",):
            raise self.error(f"{path}: expected a top-level 'zcache:' mapping")
        return path, settings[1:]


class ConfigTable(_ConfigDirective):
    """The table of every ``zcache.*`` key, from the shipped YAML."""

    def run(self) -> list[nodes.Node]:
        _path, settings = self.settings()
        fields = config_fields()
        sections = {s.path: s for s in settings if s.is_section}
        rows: list[list[nodes.entry]] = []
        for s in settings:
            key = s.dotted
            short = ".".join(s.path[1:])
            comment = s.comment
            if s.is_section:
                rows.append(
                    [
                        _cell(nodes.literal(key, key)),
                        _cell(nodes.Text("(section)")),
                        _cell(nodes.Text("")),
                        _cell(*_inline(comment)),
                    ]
                )
                continue
            if not comment:
                parent = sections.get(s.path[:-1])
                if parent is not None and parent.comment and len(s.path) > 2:
                    ref = parent.dotted
                    comment = f"See `{ref}` above."
                else:
                    logger.warning(
                        "zcache config table: %s (line %d) has no comment describing it; "
                        "add one above the key",
                        key,
                        s.line,
                        location=(self.env.docname, self.lineno),
                    )
            field = fields.get(short, "")
            if short == "caches":
                field_nodes: list[nodes.Node] = [
                    nodes.literal('cache_config="NAME"', 'cache_config="NAME"')
                ]
            elif field:
                name, _, note = field.partition(" ")
                field_nodes = [nodes.literal(name, name)]
                if note:
                    field_nodes.append(nodes.Text(" " + note))
            else:
                field_nodes = [nodes.Text("")]
            default = format_default(s.value)
            rows.append(
                [
                    _cell(nodes.literal(key, key)),
                    _cell(nodes.literal(default, default)),
                    _cell(*field_nodes),
                    _cell(*_inline(comment)),
                ]
            )
        table = _table(["Key", "Default", "CacheConfig field", "Meaning"], [22, 12, 18, 48], rows)
        source = nodes.paragraph(
            "",
            "",
            nodes.Text("Generated at build time from "),
            nodes.literal("xarray_zcache/zcache.yaml", "xarray_zcache/zcache.yaml"),
            nodes.Text(f" ({len([s for s in settings if not s.is_section])} settings)."),
        )
        source["classes"].append("zcache-generated")
        return [table, source]


class EnvVars(_ConfigDirective):
    """The environment variable of each ``zcache.*`` key."""

    def run(self) -> list[nodes.Node]:
        _path, settings = self.settings()
        items = nodes.bullet_list()
        for s in settings:
            if s.is_section:
                continue
            short = ".".join(s.path[1:])
            item = nodes.list_item()
            item += nodes.paragraph(
                "",
                "",
                nodes.literal(env_var(short), env_var(short)),
                nodes.Text(" sets "),
                nodes.literal(s.dotted, s.dotted),
            )
            items += item
        return [items]


# -- the CLI's --help ------------------------------------------------------------------------

_HELP_RUNNER = """
import sys
sys.argv = ["zcache", *sys.argv[1:]]
from xarray_zcache.cli import main
rc = main()
sys.exit(rc if isinstance(rc, int) else 0)
"""


class CliHelp(SphinxDirective):
    """The output of ``zcache [SUBCOMMAND ...] --help``, captured at build time."""

    has_content = False
    optional_arguments = 10
    option_spec = {"optional": directives.flag}

    def run(self) -> list[nodes.Node]:
        words = " ".join(self.arguments).split()
        shown = " ".join(["zcache", *words, "--help"])
        # rebuild this page when the cli package appears, changes or goes away
        package = importlib.util.find_spec("xarray_zcache")
        if package is not None and package.origin is not None:
            folder = Path(package.origin).parent
            self.env.note_dependency(str(folder))
            for module in sorted((folder / "cli").glob("*.py")):
                self.env.note_dependency(str(module))
        if importlib.util.find_spec("xarray_zcache.cli") is None:
            return [
                self._note(
                    "The ",
                    nodes.literal("zcache", "zcache"),
                    " command (",
                    nodes.literal("xarray_zcache/cli/", "xarray_zcache/cli/"),
                    ") is not part of this build, so the output of ",
                    nodes.literal(shown, shown),
                    " cannot be shown here.",
                )
            ]
        env = {**os.environ, "COLUMNS": "90", "NO_COLOR": "1", "TERM": "dumb"}
        try:
            proc = subprocess.run(
                [sys.executable, "-P", "-c", _HELP_RUNNER, *words, "--help"],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
                check=False,
            )
            output, failed = proc.stdout.rstrip(), proc.returncode != 0 or not proc.stdout.strip()
            detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as exc:
            output, failed, detail = "", True, str(exc)
        if failed:
            if "optional" in self.options:
                return [
                    self._note(
                        nodes.literal(shown, shown),
                        " is not available in this build: ",
                        nodes.literal(detail, detail),
                    )
                ]
            logger.warning(
                "zcache-cli-help: %r failed: %s",
                shown,
                detail,
                location=(self.env.docname, self.lineno),
            )
            return []
        text = f"$ {shown}\n{output}"
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]

    @staticmethod
    def _note(*parts: str | nodes.Node) -> nodes.Node:
        """A note; command lines go in as literals (no smart dashes in ``--help``)."""
        note = nodes.note()
        note += nodes.paragraph(
            "", "", *(nodes.Text(p) if isinstance(p, str) else p for p in parts)
        )
        return note


def _dataclass_signature(
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None] | None:
    """Show ``name=...`` instead of ``name=<factory>`` for dataclass fields read from dask."""
    if signature and "=<factory>" in signature:
        return signature.replace("=<factory>", "=..."), return_annotation
    return None


def _no_class_rtype(
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> None:
    """Drop the "return type" autodoc records for a class from its ``__new__`` annotation."""
    if what != "class":
        return
    document = getattr(app.env, "current_document", None)
    annotations = getattr(document, "autodoc_annotations", None)
    if isinstance(annotations, dict):
        annotations.get(name, {}).pop("return", None)


def _resolve_short_names(
    app: Sphinx, env: Any, node: Any, contnode: nodes.Element
) -> nodes.Element | None:
    """Link `HybridCache` in a docstring to the one documented object of that name.

    Docstrings name objects without their module (`CachedStore`, `install`); the API
    page documents them under their public paths (``xarray_zcache.CachedStore``). An
    unresolved Python reference whose name matches exactly one documented object by
    its last components is linked to it; anything else stays unresolved (plain code).
    """
    if node.get("refdomain") != "py":
        return None
    target = str(node.get("reftarget", "")).lstrip("~.")
    if not target or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", target):
        return None
    objects = env.get_domain("py").objects
    # one object may be known under two names (its public path and its canonical one)
    found = {
        (entry.docname, entry.node_id): name
        for name, entry in objects.items()
        if name == target or name.endswith("." + target)
    }
    if not found and target.startswith("xarray_zcache."):
        # a private module path (xarray_zcache.registry.get_cache) of a public object
        last = target.rsplit(".", 1)[1]
        found = {
            (entry.docname, entry.node_id): name
            for name, entry in objects.items()
            if name.startswith("xarray_zcache.") and name.endswith("." + last)
        }
    if len(found) != 1:
        return None
    from sphinx.util.nodes import make_refnode

    ((docname, node_id), name), *_ = found.items()
    return make_refnode(app.builder, node["refdoc"], docname, node_id, contnode, name)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("missing-reference", _resolve_short_names)
    app.connect("autodoc-process-signature", _dataclass_signature)
    # after sphinx.ext.autodoc.typehints records the annotations (default priority 500)
    app.connect("autodoc-process-signature", _no_class_rtype, priority=900)
    app.add_directive("zcache-config-table", ConfigTable)
    app.add_directive("zcache-env-vars", EnvVars)
    app.add_directive("zcache-cli-help", CliHelp)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
