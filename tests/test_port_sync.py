"""The two first-party ports (InternLM2, Baichuan2) share code written once for InternLM2: the
definitions listed here must stay identical to InternLM2's after its names are renamed. The ports'
bytes are pinned (manifest sha256, patch pre-images), so the shared blocks are listed here rather than
marked inside the files; change one port and this fails until the other follows (or the entry goes)."""

import ast
from pathlib import Path

import pytest

ZOO = Path(__file__).resolve().parents[1] / "huggingface_model"
INTERNLM2 = ZOO / "internlm/internlm2_7b/port/modeling_internlm2.py"
BAICHUAN2 = ZOO / "baichuan_inc/Baichuan2_7B_Base/port/modeling_baichuan.py"
RENAMES = (("InternLM2", "Baichuan"), ("internlm2", "baichuan"))
# (InternLM2 definition, Baichuan2 definition, extra renames for that definition)
SHARED = [
    ("InternLM2RMSNorm", "BaichuanRMSNorm", ()),
    ("InternLM2RotaryEmbedding", "BaichuanRotaryEmbedding", ()),
    ("rotate_half", "rotate_half", ()),
    ("apply_rotary_pos_emb", "apply_rotary_pos_emb", ()),
    ("repeat_kv", "repeat_kv", ()),
    ("eager_attention_forward", "eager_attention_forward", ()),
    ("InternLM2Model", "BaichuanModel", (("tok_embeddings", "embed_tokens"),)),  # each keeps its checkpoint's key
]


def definitions(path: Path) -> dict[str, str]:
    source = path.read_text()
    tree = ast.parse(source)
    found = {n.name: ast.get_source_segment(source, n) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    # the sibling import for a lone file (the zoo), nested in a try / except ImportError
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_load_sibling":
            found["_load_sibling"] = ast.get_source_segment(source, node)
    return found


@pytest.mark.parametrize("internlm2, baichuan2, renames", [*SHARED, ("_load_sibling", "_load_sibling", ())],
                         ids=[s[0] for s in SHARED] + ["_load_sibling"])
def test_shared_definitions_stay_identical(internlm2, baichuan2, renames):
    theirs, ours = definitions(INTERNLM2), definitions(BAICHUAN2)
    expected = theirs[internlm2]
    for old, new in (*RENAMES, *renames):
        expected = expected.replace(old, new)
    assert ours[baichuan2] == expected, f"{BAICHUAN2.name}: {baichuan2} no longer follows {INTERNLM2.name}: {internlm2}"


def test_the_table_covers_every_definition_the_ports_share():
    """A definition whose renamed source is the same in both ports but is missing from SHARED fails here."""
    theirs, ours = definitions(INTERNLM2), definitions(BAICHUAN2)
    listed = {a for a, _, _ in SHARED} | {"_load_sibling"}
    for name, source in theirs.items():
        renamed = source
        for old, new in RENAMES:
            renamed = renamed.replace(old, new)
        twin = name
        for old, new in RENAMES:
            twin = twin.replace(old, new)
        if ours.get(twin) == renamed:
            assert name in listed, f"{name} is the same in both ports: list it in SHARED"
