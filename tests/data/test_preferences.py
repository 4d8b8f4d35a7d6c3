"""Preference readers and datasets on small files built in tmp_path (offline, a few seconds)."""

from __future__ import annotations

import io
import json
import logging
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmalign.data import (
    PreferenceList,
    PreferencePair,
    PreferenceStream,
    Ranking,
    detect_format,
    load_preferences,
    read_hf_dataset,
    read_hpdv2,
    read_imagereward_db,
    read_jsonl,
    read_pickapic,
)
from mmalign.errors import DataError, MediaError


def image(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    """A noisy RGB image (so crops and flips change pixels), distinct per seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def png_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    buffer = io.BytesIO()
    image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image(seed, size).save(path)
    return path.name


# ---------------------------------------------------------------- Pick-a-Pic


PICKAPIC_ROWS = [
    # caption, jpg_0, jpg_1, label_0, label_1, has_label
    ("zero wins", png_bytes(0), png_bytes(1), 1.0, 0.0, True),
    ("one wins", png_bytes(2), png_bytes(3), 0.0, 1.0, True),
    ("a tie", png_bytes(4), png_bytes(5), 0.5, 0.5, True),
    ("unlabeled", png_bytes(6), png_bytes(7), 0.0, 0.0, False),
    ("corrupt", png_bytes(8), b"this is not an image", 1.0, 0.0, True),
    ("bad label", png_bytes(10), png_bytes(11), 1.5, 0.0, True),
]


def write_pickapic(path: Path, rows=PICKAPIC_ROWS) -> Path:
    columns = list(zip(*rows))
    table = pa.table(
        {
            "caption": pa.array(columns[0], pa.string()),
            "jpg_0": pa.array(columns[1], pa.binary()),
            "jpg_1": pa.array(columns[2], pa.binary()),
            "label_0": pa.array(columns[3], pa.float64()),
            "label_1": pa.array(columns[4], pa.float64()),
            "has_label": pa.array(columns[5], pa.bool_()),
            "model_0": pa.array([f"m0-{i}" for i in range(len(rows))]),
            "model_1": pa.array([f"m1-{i}" for i in range(len(rows))]),
            "ranking_id": pa.array(list(range(len(rows))), pa.int64()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=4)
    return path


def test_pickapic_winner_first_ties_unlabeled_and_bad_rows(tmp_path, caplog):
    path = write_pickapic(tmp_path / "train-00000-of-00001.parquet")
    with caplog.at_level(logging.INFO, logger="mmalign.data"):
        stream = read_pickapic(path, batch_size=2)
        assert isinstance(stream, PreferenceStream)
        pairs = list(stream)
    # decode=False: the corrupt bytes pass (caught at fetch time); the bad label is skipped.
    assert [p.prompt for p in pairs] == ["zero wins", "one wins", "corrupt"]
    assert pairs[0].chosen == png_bytes(0) and pairs[0].rejected == png_bytes(1)
    assert pairs[1].chosen == png_bytes(3) and pairs[1].rejected == png_bytes(2)  # winner put first
    assert pairs[1].meta["winner_index"] == 1 and pairs[1].meta["model_1"] == "m1-1"
    assert all(p.label == 1.0 for p in pairs)
    assert pairs[0].source == f"{path} row 0"
    report = stream.report
    assert (report.rows, report.pairs, report.ties_dropped, report.unlabeled) == (6, 3, 1, 1)
    assert stream.skipped == [(f"{path} row 5", "'label_0' = 1.5 is outside [0, 1]")]
    assert "skipped 1 of 6 rows" in caplog.text and "row 5" in caplog.text


def test_pickapic_keep_ties_and_decode(tmp_path):
    path = write_pickapic(tmp_path / "p.parquet")
    pairs = read_pickapic(path, tie_policy="keep", decode=True, stream=False, batch_size=4)
    assert isinstance(pairs, PreferenceList)
    assert [(p.prompt, p.label) for p in pairs] == [("zero wins", 1.0), ("one wins", 1.0), ("a tie", 0.5)]
    reasons = dict(pairs.skipped)
    assert set(reasons) == {f"{path} row 4", f"{path} row 5"}
    assert f"{path} row 4 jpg_1" in reasons[f"{path} row 4"]  # names the file, row and column
    assert pairs.n_skipped == 2


def test_pickapic_strict_names_the_row(tmp_path):
    path = write_pickapic(tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet row 5: 'label_0' = 1\.5"):
        list(read_pickapic(path, strict=True))


def test_pickapic_folder_split_and_dispatch(tmp_path):
    folder = tmp_path / "pickapic_v2" / "data"
    write_pickapic(folder / "train-00000-of-00002.parquet", PICKAPIC_ROWS[:2])
    write_pickapic(folder / "train-00001-of-00002.parquet", PICKAPIC_ROWS[2:4])
    write_pickapic(folder / "validation-00000-of-00001.parquet", PICKAPIC_ROWS[:1])
    assert detect_format(tmp_path / "pickapic_v2") == "pickapic"
    train = load_preferences(tmp_path / "pickapic_v2", split="train", tie_policy="keep", stream=False)
    assert [p.prompt for p in train] == ["zero wins", "one wins", "a tie"]
    assert train.report.unlabeled == 1
    everything = list(load_preferences(tmp_path / "pickapic_v2"))
    assert len(everything) == 3  # 2 + 0 (tie dropped, unlabeled ignored) + 1


def test_not_parquet_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"nope")
    with pytest.raises(DataError, match="broken.parquet: not a readable parquet file"):
        list(read_pickapic(path))


# ---------------------------------------------------------------- rankings


def test_ranking_expands_all_pairs_with_ties():
    ranking = Ranking("p", ["a", "b", "c", "d"], [2, 1, 2, 3], source="x row 0")
    pairs = ranking.to_pairs()
    assert len(pairs) == 6  # C(4, 2)
    ordered = {(p.chosen, p.rejected): p.label for p in pairs}
    assert ordered == {
        ("b", "a"): 1.0,
        ("a", "c"): 0.5,
        ("a", "d"): 1.0,
        ("b", "c"): 1.0,
        ("b", "d"): 1.0,
        ("c", "d"): 1.0,
    }
    assert len(ranking.to_pairs("drop")) == 5
    with pytest.raises(ValueError, match="2 ranks"):
        Ranking("p", ["a", "b", "c"], [1, 2])


def test_pair_orientation_and_label_checks():
    pair = PreferencePair("p", "a", "b", label=0.25, score_chosen=1.0, score_rejected=2.0)
    oriented = pair.oriented()
    assert (oriented.chosen, oriented.rejected, oriented.label) == ("b", "a", 0.75)
    assert (oriented.score_chosen, oriented.score_rejected) == (2.0, 1.0)
    with pytest.raises(ValueError, match="outside"):
        PreferencePair("p", "a", "b", label=1.5)


def write_hpdv2(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "hpd" / "test"
    names = [save_png(images / f"{i:05d}.png", i) for i in range(7)]
    rows = [
        {"prompt": "three", "image_path": names[:3], "rank": [2, 1, 3]},
        {"prompt": "four with a tie", "image_path": names[3:7], "rank": [1, 1, 2, 3]},
        {"prompt": "no ranks", "image_path": names[:2]},
        {"prompt": "wrong length", "image_path": names[:2], "rank": [1, 2, 3]},
        {"prompt": "missing file", "image_path": ["gone.png", names[0]], "rank": [1, 2]},
    ]
    test_json = tmp_path / "hpd" / "test.json"
    test_json.write_text(json.dumps(rows))
    train_dir = tmp_path / "hpd" / "train"
    train_names = [save_png(train_dir / f"t{i}.png", 20 + i) for i in range(4)]
    train_rows = [
        {"prompt": "second preferred", "file_path": train_names[:2], "human_preference": [0, 1]},
        {"prompt": "first preferred", "file_path": train_names[2:], "human_preference": [1, 0]},
    ]
    train_json = tmp_path / "hpd" / "train.json"
    train_json.write_text(json.dumps(train_rows))
    return test_json, train_json


def test_hpdv2_test_and_train(tmp_path):
    test_json, train_json = write_hpdv2(tmp_path)
    root = tmp_path / "hpd" / "test"
    pairs = read_hpdv2(test_json, image_root=root)
    assert len(pairs) == 3 + 5  # C(3,2) + C(4,2) minus one tie
    first = [p for p in pairs if p.prompt == "three"]
    assert {(Path(p.chosen).name, Path(p.rejected).name) for p in first} == {
        ("00001.png", "00000.png"),
        ("00001.png", "00002.png"),
        ("00000.png", "00002.png"),
    }
    assert pairs.report.ties_dropped == 1
    skipped = dict(pairs.skipped)
    assert set(skipped) == {f"{test_json} row 2", f"{test_json} row 3", f"{test_json} row 4"}
    assert "'rank' (test.json)" in skipped[f"{test_json} row 2"]
    assert "3 ranks" in skipped[f"{test_json} row 3"] or "2 items" in skipped[f"{test_json} row 3"]
    assert "gone.png" in skipped[f"{test_json} row 4"]

    kept = load_preferences(test_json, image_root=root, tie_policy="keep")
    assert len(kept) == 9 and sum(p.is_tie for p in kept) == 1

    train = load_preferences(train_json, image_root=tmp_path / "hpd" / "train")
    assert [(p.prompt, Path(p.chosen).name) for p in train] == [
        ("second preferred", "t1.png"),
        ("first preferred", "t2.png"),
    ]


def test_hpdv2_wrong_file_shape_and_wrong_rows(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps({"prompt": "not a list"}))
    with pytest.raises(DataError, match="test.json: expected a JSON list"):
        read_hpdv2(path)
    path.write_text(json.dumps([{"caption": "x"}, {"caption": "y"}]))
    with pytest.raises(DataError, match="none of its 2 rows could be read"):
        read_hpdv2(path)


def test_imagereward_db(tmp_path):
    folder = tmp_path / "ir"
    names = [f"images/{save_png(folder / 'images' / f'g{i}.png', 40 + i)}" for i in range(4)]
    rows = [
        {"id": "a", "prompt": "ranked", "generations": names, "ranking": [3, 1, 2, 2]},
        {"id": "b", "prompt": "bad", "generations": names[:2], "ranking": "1,2"},
    ]
    path = folder / "test.json"
    path.write_text(json.dumps(rows))
    assert detect_format(path) == "imagereward"
    pairs = read_imagereward_db(path, tie_policy="keep")
    assert len(pairs) == 6  # C(4, 2)
    assert sorted(p.label for p in pairs) == [0.5] + [1.0] * 5
    best = [p for p in pairs if Path(p.chosen).name == "g1.png"]
    assert len(best) == 3 and all(p.label == 1.0 for p in best)
    assert all(p.meta["id"] == "a" for p in pairs)
    assert pairs.skipped == [(f"{path} row 1", "'ranking' must be a list, got str '1,2'")]
    assert len(read_imagereward_db(path)) == 5


# ---------------------------------------------------------------- JSONL


def write_jsonl(tmp_path: Path) -> Path:
    folder = tmp_path / "prefs"
    a, b = save_png(folder / "img" / "a.png", 1), save_png(folder / "img" / "b.png", 2)
    absolute_b = str((folder / "img" / b).resolve())
    lines = [
        {"prompt": "plain", "chosen": f"img/{a}", "rejected": f"img/{b}"},
        {"prompt": "soft", "chosen": f"img/{a}", "rejected": absolute_b, "label": 0.25, "score_chosen": 0.1},
        {"prompt": "tie", "chosen": f"img/{a}", "rejected": f"img/{b}", "label": 0.5},
        {"prompt": "no rejected", "chosen": f"img/{a}"},
        {"prompt": "bad label", "chosen": f"img/{a}", "rejected": f"img/{b}", "label": 2},
        {"prompt": "missing image", "chosen": "img/none.png", "rejected": f"img/{b}"},
        {"prompt": 7, "chosen": f"img/{a}", "rejected": f"img/{b}"},
    ]
    text = "\n".join(json.dumps(line) for line in lines[:3]) + "\n\n{not json\n"
    text += "\n".join(json.dumps(line) for line in lines[3:]) + "\n"
    path = folder / "pairs.jsonl"
    path.write_text(text)
    return path


def test_jsonl_pairs_labels_and_bad_rows(tmp_path, caplog):
    path = write_jsonl(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mmalign.data"):
        pairs = load_preferences(path)
    assert [p.prompt for p in pairs] == ["plain", "soft"]
    plain, soft = pairs
    assert Path(plain.chosen) == path.parent / "img" / "a.png" and plain.label == 1.0
    # label 0.25 means the rejected image was preferred: oriented winner first with label 0.75.
    assert Path(soft.chosen).name == "b.png" and soft.label == 0.75 and soft.score_rejected == 0.1
    assert plain.source == f"{path} line 1"
    assert pairs.report.ties_dropped == 1
    skipped = dict(pairs.skipped)
    assert list(skipped) == [f"{path} line {n}" for n in (5, 6, 7, 8, 9)]
    assert "invalid JSON" in skipped[f"{path} line 5"]
    assert "missing key(s) 'rejected'" in skipped[f"{path} line 6"]
    assert "outside [0, 1]" in skipped[f"{path} line 7"]
    assert "none.png" in skipped[f"{path} line 8"]
    assert "'prompt' must be a string" in skipped[f"{path} line 9"]
    assert f"{path}: skipped 5 of 8 rows" in caplog.text

    kept = read_jsonl(path, tie_policy="keep")
    assert [p.label for p in kept] == [1.0, 0.75, 0.5]
    with pytest.raises(ValueError, match="tie_policy"):
        read_jsonl(path, tie_policy="half")


def test_jsonl_strict_raises_on_first_bad_row(tmp_path):
    path = write_jsonl(tmp_path)
    with pytest.raises(DataError, match=r"pairs\.jsonl line 5: invalid JSON"):
        read_jsonl(path, strict=True)


def test_jsonl_decode_skips_unreadable_image(tmp_path):
    folder = tmp_path / "d"
    save_png(folder / "ok.png", 1)
    (folder / "broken.png").write_bytes(png_bytes(2)[:60])  # truncated
    path = folder / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "ok", "chosen": "ok.png", "rejected": "ok.png"})
        + "\n"
        + json.dumps({"prompt": "broken", "chosen": "ok.png", "rejected": "broken.png"})
        + "\n"
    )
    assert len(read_jsonl(path)) == 2  # without decode only existence is checked
    pairs = read_jsonl(path, decode=True)
    assert [p.prompt for p in pairs] == ["ok"]
    ((where, reason),) = pairs.skipped
    assert where == f"{path} line 2" and "broken.png" in reason


# ---------------------------------------------------------------- Hugging Face datasets


def test_hf_dataset_from_disk_pickapic_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = PICKAPIC_ROWS[:4]
    columns = list(zip(*rows))
    data = datasets.Dataset.from_dict(
        {
            "caption": list(columns[0]),
            "jpg_0": list(columns[1]),
            "jpg_1": list(columns[2]),
            "label_0": list(columns[3]),
            "label_1": list(columns[4]),
            "has_label": list(columns[5]),
        }
    )
    folder = tmp_path / "hf_pickapic"
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(folder))
    assert detect_format(folder) == "hf"
    pairs = load_preferences(folder, tie_policy="keep")
    assert [(p.prompt, p.label) for p in pairs] == [("zero wins", 1.0), ("one wins", 1.0), ("a tie", 0.5)]
    assert pairs[1].chosen == png_bytes(3)
    assert pairs.report.unlabeled == 1
    assert len(read_hf_dataset(folder, split="test")) == 1
    with pytest.raises(DataError, match="no split 'validation'"):
        read_hf_dataset(folder, split="validation")


def test_hf_dataset_column_mapping_with_image_feature(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict(
        {
            "text": ["mapped", "soft"],
            "win": [image(1), image(3)],
            "lose": [image(2), image(4)],
            "p": [1.0, 0.2],
        }
    ).cast_column("win", datasets.Image())
    data = data.cast_column("lose", datasets.Image())
    folder = tmp_path / "hf_mapped"
    data.save_to_disk(str(folder))
    pairs = read_hf_dataset(folder, columns={"prompt": "text", "chosen": "win", "rejected": "lose", "label": "p"})
    assert [p.prompt for p in pairs] == ["mapped", "soft"]
    assert isinstance(pairs[0].chosen, bytes)  # read undecoded
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(pairs[1].chosen))), np.asarray(image(4)))
    assert pairs[1].label == pytest.approx(0.8)
    with pytest.raises(DataError, match="missing column"):
        read_hf_dataset(folder, columns={"prompt": "caption", "chosen": "win", "rejected": "lose"})


# ---------------------------------------------------------------- torch dataset


def test_dataset_tensors_range_and_determinism(tmp_path):
    from mmalign.data import PreferenceDataset

    pairs = [
        PreferencePair("a", png_bytes(1, (48, 32)), png_bytes(2, (48, 32)), source="mem row 0"),
        PreferencePair("b", image(3, (30, 60)), image(4, (30, 60)), label=0.5, source="mem row 1"),
    ]
    train = PreferenceDataset(pairs, resolution=24, seed=7)
    item = train[0]
    assert item["chosen_pixels"].shape == (3, 24, 24) and item["rejected_pixels"].shape == (3, 24, 24)
    for key in ("chosen_pixels", "rejected_pixels"):
        assert item[key].dtype.is_floating_point
        assert item[key].min() >= -1.0 and item[key].max() <= 1.0
        assert item[key].min() < -0.5 and item[key].max() > 0.5
    assert item["prompt"] == "a" and float(item["label"]) == 1.0
    assert tuple(item["original_size"].tolist()) == (32, 48)
    assert float(train[1]["label"]) == 0.5

    again = PreferenceDataset(pairs, resolution=24, seed=7)
    for index in range(2):
        first, second = train[index], again[index]
        assert (first["chosen_pixels"] == second["chosen_pixels"]).all()
        assert (first["rejected_pixels"] == second["rejected_pixels"]).all()

    draws = {tuple(PreferenceDataset(pairs, resolution=24, seed=s)[0]["crop_top_left"].tolist()) for s in range(8)}
    flips = {float(PreferenceDataset(pairs, resolution=24, seed=s)[0]["chosen_pixels"].sum()) for s in range(8)}
    assert len(draws) > 1 and len(flips) > 1  # random crops and flips under different seeds

    evaluation = PreferenceDataset(pairs, resolution=24, train=False, seed=0)
    centre = evaluation[0]
    assert tuple(centre["crop_top_left"].tolist()) == (0, 6)  # 48x32 -> 36x24, centre crop
    other_seed = PreferenceDataset(pairs, resolution=24, train=False, seed=99)[0]
    assert (centre["chosen_pixels"] == other_seed["chosen_pixels"]).all()


def test_dataset_replaces_undecodable_pair_with_next(tmp_path, caplog):
    from mmalign.data import PreferenceDataset

    pairs = [
        PreferencePair("bad", b"garbage", png_bytes(1), source="file.parquet row 3"),
        PreferencePair("good", png_bytes(2), png_bytes(3), source="file.parquet row 4"),
    ]
    dataset = PreferenceDataset(pairs, resolution=16)
    with caplog.at_level(logging.WARNING, logger="mmalign.data"):
        item = dataset[0]
    assert item["prompt"] == "good" and item["index"] == 1
    assert "file.parquet row 3 chosen" in dataset.failed[0]
    assert "file.parquet row 3" in caplog.text
    with pytest.raises(DataError, match="none of its 1 pairs"):
        PreferenceDataset(pairs[:1], resolution=16)[0]


def test_iterable_dataset_over_a_pickapic_stream(tmp_path):
    import torch

    from mmalign.data import IterablePreferenceDataset

    path = write_pickapic(tmp_path / "p.parquet")
    dataset = IterablePreferenceDataset(read_pickapic(path), resolution=16, seed=1)
    items = list(dataset)
    assert [item["prompt"] for item in items] == ["zero wins", "one wins"]  # the corrupt pair is skipped
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["chosen_pixels"].shape == (2, 3, 16, 16) and batch["label"].tolist() == [1.0, 1.0]


def test_decode_errors_name_the_source():
    from mmalign.data import decode_image

    with pytest.raises(MediaError, match="somefile row 2 jpg_0: not an image"):
        decode_image(b"xx", "somefile row 2 jpg_0")
    assert decode_image(png_bytes(0)).mode == "RGB"


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, mmalign.data; print(any(m in sys.modules for m in ('torch', 'pyarrow', 'datasets')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_ranking_pair_count_matches_combinations():
    for n in range(2, 7):
        ranking = Ranking("p", [str(i) for i in range(n)], list(range(n)))
        assert len(ranking.to_pairs()) == len(list(combinations(range(n), 2)))
