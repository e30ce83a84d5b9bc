"""Tests of the refer-style loader and its restricted (no-globals) unpickler."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from diffprompt.training.data.masks import rle_to_mask
from diffprompt.training.data.records import DatasetError
from diffprompt.training.data.refer import VALID_SPLITS, load_refer, safe_load_refs

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 48, 64
POLYGON = [10.0, 10.0, 30.0, 10.0, 30.0, 40.0, 10.0, 40.0]


def _instances() -> dict:
    return {
        "images": [
            {"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "height": H, "width": W},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": H, "width": W},
        ],
        "annotations": [
            {"id": 1001, "image_id": 581857, "bbox": [10, 10, 20, 30], "segmentation": [POLYGON],
             "area": 600.0, "iscrowd": 0, "category_id": 18},
            {"id": 1002, "image_id": 2, "bbox": [0.5, 1.0, 4.0, 2.0], "area": 8.0, "iscrowd": 0, "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, sents: list[tuple[int, str]]) -> dict:
    return {
        "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "sent_ids": [i for i, _ in sents],
        "sentences": [{"sent_id": i, "sent": s, "raw": s, "tokens": s.split()} for i, s in sents],
    }


def _refs() -> list[dict]:
    return [
        _ref(0, 1001, 581857, "train", [(0, "the left dog"), (1, "dog on the left")]),
        _ref(1, 1002, 2, "testA", [(2, "man in red")]),
        _ref(2, 1002, 2, "val", [(3, "a man")]),
    ]


def _write(tmp_path: Path, refs: Any = None, instances: Any = None, *, protocol: int = 2) -> tuple[Path, Path]:
    refs_path, instances_path = tmp_path / "refs(unc).p", tmp_path / "instances.json"
    refs_path.write_bytes(pickle.dumps(_refs() if refs is None else refs, protocol=protocol))
    instances_path.write_text(json.dumps(_instances() if instances is None else instances))
    return refs_path, instances_path


def _globals_in(data: bytes) -> list[str]:
    return [op.name for op, _, _ in pickletools.genops(data) if "GLOBAL" in op.name or op.name == "INST"]


# ------------------------------------------------------- a Python-2 style protocol-2 encoder


def _py2_pickle(obj: Any) -> bytes:
    """Protocol-2 bytes as Python 2 cPickle writes them: py2 `str` (here: bytes) is BINSTRING."""

    def enc(o: Any) -> bytes:
        if isinstance(o, bytes):  # Python 2 str
            return (b"U" + bytes([len(o)]) if len(o) < 256 else b"T" + struct.pack("<i", len(o))) + o
        if isinstance(o, str):  # Python 2 unicode
            raw = o.encode("utf-8")
            return b"X" + struct.pack("<I", len(raw)) + raw
        if isinstance(o, bool) or o is None:
            return {True: b"\x88", False: b"\x89", None: b"N"}[o]
        if isinstance(o, int):
            return b"J" + struct.pack("<i", o)
        if isinstance(o, list):
            return b"](" + b"".join(enc(v) for v in o) + b"e"
        if isinstance(o, dict):
            return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"
        raise TypeError(type(o))

    return b"\x80\x02" + enc(obj) + b"."


def test_py2_encoder_is_a_valid_pickle() -> None:
    data = _py2_pickle({b"a": [1, "x", None]})
    assert pickle.loads(data, encoding="bytes") == {b"a": [1, "x", None]}


# ------------------------------------------------------- safe_load_refs


def test_valid_protocol2_pickle_loads(tmp_path: Path) -> None:
    refs_path, _ = _write(tmp_path)
    assert _globals_in(refs_path.read_bytes()) == []
    assert safe_load_refs(refs_path) == _refs()


@pytest.mark.parametrize("protocol", [0, 1, 3, 4, 5])
def test_other_protocols_load(tmp_path: Path, protocol: int) -> None:
    refs_path, _ = _write(tmp_path, protocol=protocol)
    assert safe_load_refs(refs_path) == _refs()


def test_python2_str_bytes_become_str(tmp_path: Path) -> None:
    path = tmp_path / "refs(unc).p"
    refs = [{b"split": b"train", b"sentences": [{b"sent": b"caf\xc3\xa9 table", b"sent_id": 5}],
             b"note": b"na\xefve", "unicode_key": "d\u00e9j\u00e0 vu", b"ok": True}]
    path.write_bytes(_py2_pickle(refs))
    assert _globals_in(path.read_bytes()) == []
    (ref,) = safe_load_refs(path)
    assert ref == {"split": "train", "sentences": [{"sent": "caf\u00e9 table", "sent_id": 5}],
                   "note": "na\u00efve", "unicode_key": "d\u00e9j\u00e0 vu", "ok": True}
    assert all(isinstance(k, str) for k in ref)


def test_python3_bytes_are_decoded(tmp_path: Path) -> None:
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([{b"sent": b"left cat", "sent_id": 1}], protocol=4))
    assert safe_load_refs(path) == [{"sent": "left cat", "sent_id": 1}]


class _SystemCall:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class _Eval:
    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple:
        return (eval, (self.source,))


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused(tmp_path: Path, protocol: int, kind: str) -> None:
    marker = tmp_path / "pwned"
    payload = (
        _SystemCall(f"touch {marker}") if kind == "os.system"
        else _Eval(f"__import__('os').system('touch {marker}')")
    )
    refs = [{"ref_id": 0, "split": "train", "sentences": payload}]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(refs, protocol=protocol))
    assert _globals_in(path.read_bytes())  # the fixture really needs a global

    with pytest.raises(DatasetError, match="refuses to load global") as info:
        safe_load_refs(path)
    message = str(info.value)
    assert str(path) in message
    assert ("system" if kind == "os.system" else "eval") in message
    with pytest.raises(DatasetError, match="refuses to load global"):
        load_refer(path, tmp_path / "instances.json", tmp_path, "train")
    assert not marker.exists()


def test_persistent_id_is_refused(tmp_path: Path) -> None:
    import io

    class _Persisting(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return "ext-1" if obj == "secret" else None

    buffer = io.BytesIO()
    _Persisting(buffer, protocol=2).dump([{"sent": "secret"}])
    path = tmp_path / "refs.p"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(DatasetError, match="persistent id"):
        safe_load_refs(path)


def test_corrupt_and_missing_pickles(tmp_path: Path) -> None:
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps(_refs(), protocol=2)[:50])
    with pytest.raises(DatasetError, match="refs.p.*not a valid pickle"):
        safe_load_refs(path)
    with pytest.raises(DatasetError, match="missing.p.*not found"):
        safe_load_refs(tmp_path / "missing.p")


# ------------------------------------------------------- load_refer


def test_load_refer_train(tmp_path: Path) -> None:
    refs_path, instances_path = _write(tmp_path)
    samples = load_refer(refs_path, instances_path, tmp_path / "train2014", "train")
    assert [s.sample_id for s in samples] == [0, 1]
    assert [s.expression for s in samples] == ["the left dog", "dog on the left"]
    s = samples[0]
    assert s.image_id == 581857 and (s.width, s.height) == (W, H) and s.kind == "unknown"
    # the image name comes from instances.json, not the ref's "..._1001.jpg"
    assert s.image_path == tmp_path / "train2014" / "COCO_train2014_000000581857.jpg"
    assert s.boxes.dtype == np.float32 and s.boxes.shape == (1, 4)
    np.testing.assert_array_equal(s.boxes, [[10, 10, 30, 40]])
    expected_area = mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([POLYGON], H, W)))
    assert len(s.masks) == 1 and isinstance(s.masks[0]["counts"], str)
    assert rle_to_mask(s.masks[0]).sum() == expected_area


def test_load_refer_other_splits(tmp_path: Path) -> None:
    refs_path, instances_path = _write(tmp_path)
    (s,) = load_refer(refs_path, instances_path, tmp_path, "testA")
    assert (s.sample_id, s.expression, s.masks) == (2, "man in red", ())
    np.testing.assert_allclose(s.boxes, [[0.5, 1.0, 4.5, 3.0]])
    assert [s.sample_id for s in load_refer(refs_path, instances_path, tmp_path, "val")] == [3]


def test_load_refer_from_python2_pickle(tmp_path: Path) -> None:
    _, instances_path = _write(tmp_path)
    ref = {b"ref_id": 7, b"ann_id": 1002, b"image_id": 2, b"split": b"testB",
           b"file_name": b"COCO_train2014_000000000002_1002.jpg",
           b"sentences": [{b"sent": b"guy w/ caf\xc3\xa9 cup", b"sent_id": 70, b"raw": b"Guy"}]}
    refs_path = tmp_path / "refs(google).p"
    refs_path.write_bytes(_py2_pickle([ref]))
    (s,) = load_refer(refs_path, instances_path, tmp_path, "testB")
    assert (s.sample_id, s.image_id, s.expression) == (70, 2, "guy w/ caf\u00e9 cup")


def test_unknown_split_lists_valid_ones(tmp_path: Path) -> None:
    refs_path, instances_path = _write(tmp_path)
    with pytest.raises(DatasetError, match="unknown split 'dev'") as info:
        load_refer(refs_path, instances_path, tmp_path, "dev")
    assert all(split in str(info.value) for split in VALID_SPLITS)


def test_split_absent_from_file(tmp_path: Path) -> None:
    refs_path, instances_path = _write(tmp_path)
    with pytest.raises(DatasetError, match=r"no ref has split 'test'.*\['testA', 'train', 'val'\]"):
        load_refer(refs_path, instances_path, tmp_path, "test")


def test_missing_files(tmp_path: Path) -> None:
    refs_path, instances_path = _write(tmp_path)
    with pytest.raises(DatasetError, match="nope.p.*not found"):
        load_refer(tmp_path / "nope.p", instances_path, tmp_path, "train")
    with pytest.raises(DatasetError, match="nope.json.*not found"):
        load_refer(refs_path, tmp_path / "nope.json", tmp_path, "train")
    instances_path.write_text("{oops")
    with pytest.raises(DatasetError, match="instances.json.*invalid JSON"):
        load_refer(refs_path, instances_path, tmp_path, "train")


@pytest.mark.parametrize(
    ("ref", "pattern"),
    [
        (_ref(5, 9999, 581857, "train", [(0, "x")]), "ref_id=5: ann_id=9999 not found in .*instances.json"),
        (_ref(5, 1001, 2, "train", [(0, "x")]), "ref_id=5: image_id=2 but its annotation 1001 is on image 581857"),
        (
            {"ref_id": 5, "split": "train"},
            r"refs\[0\].*missing required key\(s\) \['ann_id', 'image_id', 'sentences'\]",
        ),
        ({"ref_id": 5, "ann_id": 1001, "image_id": 581857, "split": "train", "sentences": [{"sent": "x"}]},
         r"ref_id=5: sentences\[0\].*'sent_id'"),
    ],
)
def test_bad_refs(tmp_path: Path, ref: dict, pattern: str) -> None:
    refs_path, instances_path = _write(tmp_path, refs=[ref])
    with pytest.raises(DatasetError, match=pattern) as info:
        load_refer(refs_path, instances_path, tmp_path, "train")
    assert "refs(unc).p" in str(info.value)


def test_ref_pointing_to_missing_image(tmp_path: Path) -> None:
    instances = _instances()
    instances["images"] = instances["images"][1:]  # drop image 581857, keep its annotation
    refs_path, instances_path = _write(tmp_path, instances=instances)
    with pytest.raises(DatasetError, match="ref_id=0: image_id=581857 not found in .*instances.json"):
        load_refer(refs_path, instances_path, tmp_path, "train")


def test_bad_annotation_bbox_names_instances_file(tmp_path: Path) -> None:
    instances = _instances()
    instances["annotations"][0]["bbox"] = [10, 10, 0, 30]
    refs_path, instances_path = _write(tmp_path, instances=instances)
    with pytest.raises(DatasetError, match="instances.json: annotation id=1001: bbox"):
        load_refer(refs_path, instances_path, tmp_path, "train")


def test_refs_must_be_a_list(tmp_path: Path) -> None:
    refs_path, instances_path = _write(tmp_path, refs={"not": "a list"})
    with pytest.raises(DatasetError, match="top level must be a list"):
        load_refer(refs_path, instances_path, tmp_path, "train")
