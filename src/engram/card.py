"""Model cards: one readable file saying what a stored version is and how to load it.

A card is Markdown with YAML front matter, the convention of model hubs and skops cards:

    ---
    library_name: pytorch            # or sklearn
    tags: [engram, continual-learning, derpp]
    engram:                          # every value below is read from the version's manifest
      version: v0004                 #   name, store id, the store's tags, message, strategy
      model: {...}                   #   spec, format, file and sha256
      signature: {...}               #   meta["signature"]
      data: {...}                    #   hparams["benchmark"]; the files trained (name, xxh3)
      lineage: [...]                 #   the experience versions it descends from
      metrics: {...}                 #   meta["metrics"], the accuracy matrix
      execution: {...}               #   torch/scikit-learn versions, device, precision
    ---
    # <store> v0004
    ... the same facts as prose and tables, and how to load the model safely

``engram export`` writes one beside every exported file (``<out>.card.md``), ``engram
show --card`` prints one, :func:`card_text` returns one for any version. The Markdown
body is rendered from the front matter alone, so the two never disagree. Nothing here is
invented: a value the store does not record is ``null`` or left out.

Values come from a store, which may be hostile: in the front matter every string that
is not a plain word is a double-quoted, escaped, one-line YAML scalar (so no tag, file
name or message can end the front matter or add keys), and in the body every such
string is a code span on one line (no Markdown or HTML of its own).

Building a card imports neither torch nor Avalanche: :func:`front_matter` and
:func:`render` take plain JSON, and :func:`collect` only reads manifests through the
store it is given. (Over 400 lines: the front matter and the body rendered from it are
one job, kept in one file so that they cannot drift apart.)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from engram.cli.output import human_bytes, num

if TYPE_CHECKING:
    from engram.store import Store

CARD_FORMAT = 1
CARD_SUFFIX = ".card.md"  # model.safetensors -> model.safetensors.card.md
# A string written unquoted: no YAML syntax, and (a letter first) no number in any YAML
# version (1e3 is a float in YAML 1.2, a string in PyYAML's 1.1); the rest is quoted.
_PLAIN_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_./+-]*")
_MAX_LINEAGE = 100_000  # a parent cycle in a hostile store ends the walk anyway


def card_path(out: Path) -> Path:
    """Where ``engram export`` writes the card of the file ``out``."""
    return out.with_name(out.name + CARD_SUFFIX)


def card_text(
    store: Store, version: int | str = "HEAD", *, export: Mapping[str, Any] | None = None
) -> str:
    """The model card of ``version`` of ``store`` (an open store), as Markdown text.

    Args:
        export: the exported file the card describes (``format``, ``file``, ``sha256``,
            ``nbytes``), when there is one; the card then says how to load that file.
    """
    return render(front_matter(collect(store, version), export=export))


def collect(store: Store, version: int | str = "HEAD") -> dict[str, Any]:
    """What a card is built from, as plain JSON: the version's manifest, its tags, the
    manifests of its ancestors (summarised) and its accuracy matrix."""
    from engram.errors import EngramError
    from engram.store import version_name

    info = store.info(version)
    full = store.manifest(info.id)
    manifest = {k: v for k, v in full.items() if k != "state"}  # (its arrays: not on a card)
    lineage, parent, seen = [], manifest.get("parent"), {info.id}
    while isinstance(parent, int) and parent not in seen and len(seen) < _MAX_LINEAGE:
        seen.add(parent)
        try:
            m = store.manifest(parent)
        except EngramError as e:  # gone (gc) or damaged: the lineage stops there, said
            lineage.append({"version": version_name(parent), "unreadable": str(e)})
            break
        lineage.append(_lineage_entry(m))
        parent = m.get("parent")
    return {
        "store": str(store.path),
        "tags": list(info.tags),
        "manifest": manifest,
        "ancestors": lineage[::-1],  # oldest first
        "state_metrics": state_metrics(store, info.id, full),
    }


def state_metrics(store: Store, version_id: int, manifest: Mapping[str, Any]) -> Any:
    """The state's ``metrics`` subtree (accuracy matrix, initial accuracy) as JSON: from
    the manifest, or read from the store if it holds tensors. None if there is none."""
    from engram.store.codec import decode_tree
    from engram.store.inspect import tree_arrays

    state = manifest.get("state")
    tree = state.get("metrics") if isinstance(state, dict) else None
    if tree is None:
        return None
    if tree_arrays(tree):  # tensors in it: read the state (small ones only expected)
        return _plain(store.load(version_id, model=False).state.get("metrics"))
    return _plain(decode_tree(tree, lambda r, p: None))  # plain JSON, already in the manifest


def _lineage_entry(manifest: Mapping[str, Any]) -> dict[str, Any]:
    meta = _dict(manifest.get("meta"))
    return {
        "version": _name(manifest.get("id")),
        "experience": meta.get("experience"),
        "kind": meta.get("kind"),
        "strategy": meta.get("strategy"),
        "created_at": manifest.get("created_at"),
        "sha256": _model_file(manifest).get("sha256"),
    }


# ------------------------------------------------------------------ the front matter


def front_matter(
    collected: Mapping[str, Any], *, export: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The card's YAML front matter (a JSON-able dict) from :func:`collect`'s result."""
    manifest = collected["manifest"]
    meta, vid = _dict(manifest.get("meta")), manifest.get("id")
    sklearn = _dict(meta.get("execution")).get("library") == "scikit-learn"
    matrix = _dict(collected.get("state_metrics"))
    lineage = [e for e in collected["ancestors"] if e.get("kind") != "mid-experience"]
    lineage.append(_lineage_entry(manifest))
    engram = {
        "card_format": CARD_FORMAT,
        "name": Path(collected["store"]).name,
        "store": collected["store"],
        "store_id": manifest.get("store_id"),
        "version": _name(vid),
        "parent": _name(manifest.get("parent")),
        "store_tags": list(collected["tags"]),
        "created_at": manifest.get("created_at"),
        "message": manifest.get("message"),
        "strategy": meta.get("strategy"),
        "experience": meta.get("experience"),
        "kind": meta.get("kind"),
        "engram_version": manifest.get("engram_version"),  # the engram that wrote it
        "store_format": manifest.get("format_version"),
        "model": {"spec": meta.get("model_spec"), **_model_file(manifest)},
        "signature": meta.get("signature"),
        "data": {
            "benchmark": _dict(meta.get("hparams")).get("benchmark"),
            "experiences": _experiences(meta, lineage),
        },
        "lineage": lineage,
        "metrics": {
            **_dict(meta.get("metrics")),
            "accuracy_matrix": matrix.get("accuracy_matrix"),
            "initial_accuracy": matrix.get("initial_accuracy"),
        },
        "execution": meta.get("execution"),
    }
    for key in ("gate", "sklearn", "hparams"):
        if key in meta:
            engram[key] = meta[key]
    if export is not None:
        engram["export"] = dict(export)
    tags = ["engram", "continual-learning", *([meta["strategy"]] if meta.get("strategy") else [])]
    return _plain({"library_name": "sklearn" if sklearn else "pytorch", "tags": tags,
                   "engram": engram})  # fmt: skip


def _model_file(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The version's model in the store: format, file, sha256, bytes (a compacted
    checkpoint has no file, only delta-coded blobs)."""
    art, ckpt = manifest.get("artifact"), manifest.get("checkpoint")
    if isinstance(art, dict):
        return {"format": art.get("format"), "file": art.get("file"),
                "sha256": art.get("sha256"), "nbytes": art.get("nbytes")}  # fmt: skip
    if isinstance(ckpt, dict):
        return {"format": "safetensors", "file": ckpt.get("file"),
                "sha256": ckpt.get("sha256"), "nbytes": ckpt.get("nbytes")}  # fmt: skip
    if isinstance(manifest.get("model"), dict):
        return {"format": "safetensors", "file": None, "sha256": None, "compacted": True}
    return {"format": None, "file": None, "sha256": None}


def _experiences(meta: Mapping[str, Any], lineage: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The data files trained so far (``meta["experience_ids"]``: ``name:xxh3``), each
    with the version that finished training it (None: still in progress)."""
    ids, experience = meta.get("experience_ids"), meta.get("experience")
    if not isinstance(ids, list) or not isinstance(experience, int):
        return []
    done = {e.get("experience"): e["version"] for e in lineage if e.get("kind") == "experience"}
    out = []
    for i, entry in enumerate(ids[: max(experience + 1, 0)]):
        name, sep, digest = str(entry).rpartition(":")
        if not sep:  # no digest recorded
            name, digest = str(entry), None
        out.append({"experience": i, "file": name, "xxh3": digest, "version": done.get(i)})
    return out


# ------------------------------------------------------------------ the text


def render(front: Mapping[str, Any]) -> str:
    """The card: ``front`` as YAML front matter, then the Markdown body rendered from it."""
    e = front["engram"]
    parts = [
        "---",
        '# written by engram from the version\'s manifest (docs/lifecycle.md, "Model cards")',
        dump_yaml(front).rstrip("\n"),
        "---",
        f"# {_code(e['name'])} {_code(e['version'])}",
        "",
        _summary(e),
        _data_section(e),
        _metrics_section(e["metrics"]),
        _signature_section(e.get("signature")),
        _libraries_section(e),
        _load_section(e),
    ]
    return "\n".join(parts) + "\n"


def dump_yaml(data: Any) -> str:
    """``data`` as YAML whose strings cannot escape their scalar (see the module doc)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None,
                     allow_unicode=False, width=math.inf)  # fmt: skip


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors for repeated values
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if _PLAIN_WORD.fullmatch(value):  # plain, or quoted by PyYAML if it reads as non-str
        return dumper.represent_str(value)
    # double-quoted: newlines, control and non-ASCII characters become escapes
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')


_Dumper.add_representer(str, _represent_str)


def _summary(e: Mapping[str, Any]) -> str:
    spec = _dict(e["model"].get("spec"))
    done = [x for x in e["lineage"] if x.get("kind") == "experience"]
    bench = _dict(e["data"].get("benchmark")).get("name")
    lines = [
        f"A {_code(spec.get('name', 'model'))} model trained with engram's "
        f"{_code(e.get('strategy') or '-')} strategy over {len(done)} experience(s)"
        + (f" of the {_code(bench)} stream" if bench else "")
        + f": version {_code(e['version'])} of store {_code(e.get('store_id'))}"
        + (f" (tags {', '.join(_code(t) for t in e['store_tags'])})" if e["store_tags"] else "")
        + f", committed {_code(e.get('created_at'))} with the message {_code(e.get('message'))}.",
    ]
    if e.get("gate"):
        lines.append(f"\nRegression gate: {_code(json.dumps(e['gate']))}.")
    return "\n".join(lines) + "\n"


def _data_section(e: Mapping[str, Any]) -> str:
    lines = ["## Data and lineage", ""]
    if e["data"]["experiences"]:
        lines += ["| experience | file | xxh3 | trained in |", "|---:|---|---|---|"]
        lines += [_row(x["experience"], x["file"], x["xxh3"], x["version"] or "in progress")
                  for x in e["data"]["experiences"]]  # fmt: skip
    elif e["data"].get("benchmark"):
        lines.append(f"Benchmark {_code(json.dumps(e['data']['benchmark']))} (no data files).")
    else:
        lines.append("No data recorded for this version.")
    lines += ["", "| version | experience | kind | created (UTC) | model sha256 |",
              "|---|---:|---|---|---|"]  # fmt: skip
    for x in e["lineage"]:
        if "unreadable" in x:
            lines.append(_row(x["version"], "", "unreadable", "", ""))
            continue
        keys = ("version", "experience", "kind", "created_at", "sha256")
        lines.append(_row(*(x.get(k) for k in keys)))
    return "\n".join(lines) + "\n"


def _metrics_section(m: Mapping[str, Any]) -> str:
    lines = ["## Metrics", ""]
    if any(m.get(k) is not None for k in ("average_accuracy", "forgetting", "bwt", "fwt")):
        lines.append(f"Average accuracy {num(m.get('average_accuracy'))}, forgetting "
                     f"{num(m.get('forgetting'))}, BWT {num(m.get('bwt'))}, "
                     f"FWT {num(m.get('fwt'))}.")  # fmt: skip
    matrix = m.get("accuracy_matrix")
    if isinstance(matrix, list) and matrix and all(isinstance(r, list) for r in matrix):
        width = max(len(r) for r in matrix)
        lines += ["", "Accuracy matrix (row i: after training experience i; column j: "
                  "tested on experience j):", "",
                  "| after \\ on | " + " | ".join(f"e{j}" for j in range(width)) + " |",
                  "|---|" + "---:|" * width]  # fmt: skip
        lines += [
            f"| e{i} | " + " | ".join(_num(a) for a in r) + " |" for i, r in enumerate(matrix)
        ]
    if len(lines) == 2:
        lines.append("No metrics recorded for this version.")
    return "\n".join(lines) + "\n"


def _signature_section(sig: Any) -> str:
    if not isinstance(sig, dict):
        return "## Signature\n\nNo signature recorded: inputs are not checked.\n"
    inputs = _dict(sig.get("input"))
    shape = ", ".join(_code(d) for d in inputs.get("shape") or [])
    classes = sig.get("classes") or []
    return (
        f"## Signature\n\nInput {_code(inputs.get('dtype'))} of shape (N, {shape}); "
        f"{len(classes)} classes {_code(json.dumps(classes))}; task labels "
        f"{'yes' if sig.get('task_labels') else 'no'}.\n"
    )


def _libraries_section(e: Mapping[str, Any]) -> str:
    lines = ["## Libraries", "", f"- engram {_code(e.get('engram_version'))} "
             f"(store format {_code(e.get('store_format'))})"]  # fmt: skip
    lines += [f"- {_code(k)}: {_code(v)}" for k, v in _dict(e.get("execution")).items()]
    if e.get("export"):
        lines.append(f"- exported by engram {_code(e['export'].get('engram_version'))}")
    return "\n".join(lines) + "\n"


# How to load each export format without running code from the file: (note, code).
_LOADERS = {
    "safetensors": (
        "The file holds only tensors and JSON metadata: reading it runs no code. The "
        "architecture is rebuilt from the recorded spec through engram's builder allowlist.",
        "import json\n\nfrom safetensors import safe_open\nfrom engram.models import build_model"
        '\n\nwith safe_open({file!r}, "pt") as f:\n'
        '    model = build_model(json.loads(f.metadata()["model_spec"]))\n'
        "    model.load_state_dict({{k: f.get_tensor(k) for k in f.keys()}})\n"
        "model.eval()  # model(x): x float32 of shape (N, {shape})",
    ),
    "onnx": (
        "An ONNX graph (no Python code); inference only.",
        "import numpy as np\nimport onnxruntime as ort\n\nsession = ort.InferenceSession("
        '{file!r}, providers=["CPUExecutionProvider"])\noutputs = session.run(None, '
        '{{"input": x.astype(np.float32)}})  # x of shape (N, {shape})',
    ),
    "skops": (
        "Load it through engram's type allowlist and scikit-learn version check; never "
        "with `skops.io.load(..., trusted=True)` on a file you did not write.",
        "from pathlib import Path\n\nfrom engram.sklearn.persist import loads\n\n"
        "estimator = loads(Path({file!r}).read_bytes(), {versions!r})\n"
        "estimator.predict(x)  # x float32 of shape (N, {shape})",
    ),
    "joblib": (
        "**This file is pickle: loading it runs code.** Load it only if you trust its "
        "source; the skops export (`--format skops`) loads without running code.",
        "import joblib\n\nestimator = joblib.load({file!r})  # runs code: trusted files only",
    ),
    None: (
        "From the store, read-only: rebuilt through engram's allowlists and checked against "
        "its recorded hashes; nothing is unpickled.",
        "import engram\n\nmodel = engram.load_model({store!r}, {version!r})",
    ),
}


def _load_section(e: Mapping[str, Any]) -> str:
    """How to load the exported file (or, with no export, the version from its store)."""
    export = _dict(e.get("export"))
    fmt, file = export.get("format"), Path(str(export.get("file"))).name
    note, template = _LOADERS.get(fmt, _LOADERS[None])
    code = template.format(
        file=file, store=e["store"], version=e["version"],
        versions=_dict(e.get("sklearn")).get("versions"),
        shape=", ".join(map(str, _dict(_dict(e.get("signature")).get("input")).get("shape") or [])),
    )  # fmt: skip
    if export:
        note += (f"\n\nFile {_code(file)}: {_code(fmt)}, {human_bytes(export.get('nbytes') or 0)}"
                 f", sha256 {_code(export.get('sha256'))}.")  # fmt: skip
    fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", code)), default=0))
    return f"## How to load\n\n{note}\n\n{fence}python\n{code}\n{fence}"


# ------------------------------------------------------------------ helpers


def _code(value: Any, *, cell: bool = False) -> str:
    """``value`` as a one-line Markdown code span (no Markdown or HTML inside it)."""
    text = value if isinstance(value, str) else json.dumps(value)
    text = "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in text)
    if cell:
        text = text.replace("|", "\\|")  # GFM splits table cells before code spans
    if not text:
        return '`""`'
    fence = "`" * (1 + max((len(r) for r in re.findall(r"`+", text)), default=0))
    pad = " " if text[0] in "` " or text[-1] in "` " else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _row(*cells: Any) -> str:
    """A Markdown table row, each cell a code span (empty if ``""``)."""
    return "| " + " | ".join("" if c == "" else _code(c, cell=True) for c in cells) + " |"


def _num(value: Any) -> str:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return num(value) if number else _code(value)


def _name(vid: Any) -> str | None:
    return f"v{vid:04d}" if isinstance(vid, int) and not isinstance(vid, bool) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _plain(tree: Any) -> Any:
    """``tree`` as JSON YAML can write: tuples as lists, keys as strings, arrays as
    lists (``tolist``), NaN and infinities as null."""
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    if isinstance(tree, Mapping):
        return {str(k): _plain(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_plain(v) for v in tree]
    if hasattr(tree, "tolist"):  # a tensor or an array, without importing torch
        return _plain(tree.tolist())
    return str(tree)
