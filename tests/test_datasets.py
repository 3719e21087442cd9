"""Dataset layouts, the converter between them, and the preflight check on a corpus of bad files."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_in_process
from utils import check_dataset, convert_dataset
from utils.data import preflight
from utils.data.images import open_rgb
from utils.data.listing import add_dataset_arguments, list_dataset, load_examples, load_training_examples
from utils.data.records import DatasetError
from utils.ghibli_datasets import GhibliDataset, ProductImageDataset


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser.parse_args(list(argv))


def noisy(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def fingerprint(examples) -> list[tuple[str, str]]:
    return sorted((hashlib.sha256(e.image_path.read_bytes()).hexdigest(), e.caption) for e in examples)


# ----------------------------------------------------------------------------- the same content in every layout

CONTENT = {  # name -> (image bytes, caption)
    "hills.png": (encoded(noisy((96, 80), 1), "PNG"), "rolling green hills in ghibli style"),
    "set/village.jpg": (encoded(noisy((80, 96), 2), "JPEG", quality=90), "a quiet village by the sea"),
    "gray.png": (encoded(noisy((72, 72), 3, "L"), "PNG"), "  a grey sky over a meadow \n"),
}


def expected_content() -> list[tuple[str, str]]:
    return sorted((hashlib.sha256(data).hexdigest(), caption.strip()) for data, caption in CONTENT.values())


def write_ghibli(folder: Path, content: dict) -> Path:
    for name, (data, _) in content.items():
        (folder / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "images" / name).write_bytes(data)
    (folder / "captions.json").write_text(json.dumps({n: c for n, (_, c) in content.items()}))
    return folder


def write_product(folder: Path, content: dict) -> Path:
    """The original's product layout: the styled image (the training target) is styled/{id}.png."""
    (folder / "products").mkdir(parents=True)
    (folder / "styled").mkdir(parents=True)
    entries = {}
    for index, (name, (data, caption)) in enumerate(content.items()):
        product = f"product_{Path(name).name}"
        (folder / "products" / product).write_bytes(encoded(noisy((64, 64), 100 + index), "PNG"))
        (folder / "styled" / f"item{index}.png").write_bytes(data)
        entries[f"item{index}"] = {"product": product, "prompt": caption}
    (folder / "captions.json").write_text(json.dumps(entries))
    return folder


def write_parquet(path: Path, content: dict) -> Path:
    import datasets
    rows = {"image": [{"bytes": data, "path": Path(name).name} for name, (data, _) in content.items()],
            "text": [caption for _, caption in content.values()]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(str(path))
    return path


def convert(source: Path, target: str, output: Path, *extra: str) -> Path:
    assert convert_dataset.main(["--dataset_dir", str(source), "--to", target, "--output_dir", str(output),
                                 *extra]) == 0
    return output


def test_every_layout_gives_the_same_training_examples(tmp_path):
    ghibli = write_ghibli(tmp_path / "ghibli", CONTENT)
    kohya = convert(ghibli, "kohya", tmp_path / "kohya")
    metadata = convert(kohya, "metadata", tmp_path / "metadata")
    back = convert(metadata, "ghibli", tmp_path / "back")
    csv_dir = tmp_path / "csv"
    (csv_dir / "set").mkdir(parents=True)
    lines = ["file_name,caption"]
    for name, (data, caption) in CONTENT.items():
        (csv_dir / name).write_bytes(data)
        lines.append(f'{name},"{caption.strip()}"')
    (csv_dir / "metadata.csv").write_text("\n".join(lines) + "\n")
    product = write_product(tmp_path / "product", CONTENT)
    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    write_parquet(parquet_dir / "train.parquet", CONTENT)
    from_parquet = convert(parquet_dir, "ghibli", tmp_path / "from_parquet")

    assert (kohya / "set" / "village.txt").read_text().strip() == "a quiet village by the sea"
    assert [json.loads(line)["file_name"] for line in (metadata / "metadata.jsonl").read_text().splitlines()] \
        == ["gray.png", "hills.png", "set/village.jpg"]
    cache = tmp_path / "cache"
    cases = {ghibli: "ghibli", kohya: "kohya", metadata: "metadata", back: "ghibli", csv_dir: "metadata",
             product: "product", parquet_dir: "hf", from_parquet: "ghibli"}
    for folder, kind in cases.items():
        args = parse("--dataset_dir", str(folder), "--dataset_type", "auto", "--dataset_cache_dir", str(cache))
        examples, dataset_type = load_training_examples(args)
        assert fingerprint(examples) == expected_content(), folder.name
        assert (dataset_type, args.dataset_type) == (kind, "auto"), folder.name  # args is read, never written
    # A parquet file named with --dataset_name (the default type yields to it); images are cached once.
    args = parse("--dataset_name", str(parquet_dir / "train.parquet"), "--dataset_cache_dir", str(cache))
    examples, dataset_type = load_training_examples(args)
    assert fingerprint(examples) == expected_content()
    assert dataset_type == "hf"
    assert len(list((cache / "images").iterdir())) == len(CONTENT)
    # The original strict loader still reads the original layouts for the trainer.
    assert fingerprint(load_examples("ghibli", ghibli)) == expected_content()
    assert fingerprint(load_examples("product", product)) == expected_content()


def test_parquet_rows_without_a_usable_image_are_reported(tmp_path):
    import datasets
    good = CONTENT["hills.png"][0]
    rows = {"image": [{"bytes": good, "path": "a.png"}, {"bytes": good[:len(good) // 2], "path": "b.png"},
                      None],
            "caption": ["a hill", "a cut hill", "no file"]}
    parquet = tmp_path / "data.parquet"
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(str(parquet))
    args = parse("--dataset_name", str(parquet), "--dataset_cache_dir", str(tmp_path / "cache"))
    report = preflight.check(list_dataset("hf", ".", dataset_name=str(parquet), cache_dir=tmp_path / "cache"))
    assert [str(p) for p in report.problems] == [
        f"{parquet}[row 2]: no image in this row",
        f"{parquet}[row 1]: truncated image (the file ends before the image data does)",
    ]
    assert [e.caption for e in load_training_examples(args)[0]] == ["a hill"]
    with pytest.raises(DatasetError, match="no image column 'picture'"):
        load_training_examples(parse("--dataset_name", str(parquet), "--image_column", "picture"))


# ----------------------------------------------------------------------------- the bad-input corpus


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image; Pillow reads only the header before refusing it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90° clockwise
    return encoded(noisy((100, 70), 5), "JPEG", exif=exif)


def palette_with_transparency() -> bytes:
    image = Image.new("P", (80, 80), 0)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.paste(1, (40, 0, 80, 80))
    return encoded(image, "PNG", transparency=0)


GOOD = {
    "good.png": encoded(noisy((80, 80), 4), "PNG"),
    "cmyk.jpg": encoded(Image.new("CMYK", (80, 80), (0, 255, 255, 0)), "JPEG"),
    "gray16.png": encoded(Image.fromarray(np.full((80, 80), 32896, dtype=np.uint16)), "PNG"),
    "palette.png": palette_with_transparency(),
    "rotated.jpg": exif_rotated_jpeg(),
    "rgba.png": encoded(noisy((80, 80), 6, "RGBA"), "PNG"),
}
BAD = {  # name -> (file bytes or None for no file, expected reason)
    "truncated.png": (encoded(noisy((120, 120), 7), "PNG")[:3000],
                      "truncated image (the file ends before the image data does)"),
    "empty.png": (b"", "zero-byte file"),
    "notes.png": (b"this is a text file, renamed\n", "not an image (Pillow cannot identify the file)"),
    "bomb.png": (bomb_png(100_000, 100_000), f"decompression bomb (more than Pillow's limit of "
                                            f"{preflight.PILLOW_PIXEL_LIMIT} pixels)"),
    "tiny.png": (encoded(noisy((16, 40), 8), "PNG"), "too small (16x40; the short side is under 64 pixels)"),
    "missing.png": (None, "caption without image (file not found)"),
    "blank.png": (encoded(noisy((80, 80), 9), "PNG"), "empty caption"),
}


def write_bad_corpus(folder: Path) -> Path:
    images = folder / "images"
    images.mkdir(parents=True)
    captions = {}
    for name, data in GOOD.items():
        (images / name).write_bytes(data)
        captions[name] = f"caption of {name}"
    for name, (data, _) in BAD.items():
        if data is not None:
            (images / name).write_bytes(data)
        captions[name] = "   " if name == "blank.png" else f"caption of {name}"
    (images / "orphan.png").write_bytes(GOOD["good.png"])
    (folder / "escape.png").write_bytes(GOOD["good.png"])  # exists, but outside images/
    captions["../escape.png"] = "an escape"
    (folder / "captions.json").write_text(json.dumps(captions))
    return folder


def expected_problems() -> set[str]:
    lines = {f"images/{name}: {reason}" for name, (_, reason) in BAD.items()}
    lines.add("images/orphan.png: image without caption")
    lines.add("../escape.png: named in captions.json but points outside images/")
    return lines


def test_bad_corpus_gives_one_report_line_per_problem(tmp_path):
    dataset = write_bad_corpus(tmp_path / "bad")
    report = preflight.check(list_dataset("auto", dataset))
    assert {str(problem) for problem in report.problems} == expected_problems()
    assert len(report.problems) == len(expected_problems())
    assert sorted(entry.name for entry in report.usable) == sorted(GOOD)
    assert report.total == len(GOOD) + len(BAD) + 2
    assert report.converted == {"CMYK": 1, "I;16": 1, "P": 1, "RGBA": 1}
    assert report.rotated == 1
    assert report.summary().startswith(f"{len(GOOD)} of {report.total} entries usable, {len(report.problems)} problem")


def test_conversions_to_rgb_keep_the_picture(tmp_path):
    dataset = write_bad_corpus(tmp_path / "bad")
    images = dataset / "images"
    assert open_pixel(images / "gray16.png", (5, 5)) == (128, 128, 128)  # 32896/65535 of full scale, not clipped
    assert open_pixel(images / "palette.png", (10, 10)) == (255, 255, 255)  # transparent: laid on white
    assert open_pixel(images / "palette.png", (60, 10)) == (200, 30, 30)
    red, green, blue = open_pixel(images / "cmyk.jpg", (40, 40))
    assert red > 200 and green < 60 and blue < 60
    assert open_rgb(images / "rotated.jpg").size == (70, 100)
    assert preflight.check_image(images / "good.png", max_image_pixels=1000).reason == \
        "decompression bomb (80x80 = 6400 pixels, limit 1000)"


def open_pixel(path: Path, xy: tuple[int, int]) -> tuple[int, int, int]:
    image = open_rgb(path)
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_policy_skip_trains_on_the_rest_and_fail_stops(tmp_path, caplog):
    dataset = write_bad_corpus(tmp_path / "bad")
    with caplog.at_level(logging.INFO):
        examples, _ = load_training_examples(parse("--dataset_dir", str(dataset)))
    assert sorted(e.image_path.name for e in examples) == sorted(GOOD)
    assert all(e.caption == f"caption of {e.image_path.name}" for e in examples)
    logged = caplog.text
    assert f"{len(GOOD)} of {len(GOOD) + len(BAD) + 2} entries usable" in logged
    for line in expected_problems():
        assert f"{line} (skipped)" in logged
    with pytest.raises(DatasetError, match=r"9 problem\(s\) and --bad_image_policy fail; first: "):
        load_training_examples(parse("--dataset_dir", str(dataset), "--bad_image_policy", "fail"))
    with pytest.raises(DatasetError, match="points outside"):
        load_examples("ghibli", dataset)  # the trainer's old strict loader refuses it too


def test_zero_usable_images_is_an_error(tmp_path):
    (tmp_path / "only_bad" / "images").mkdir(parents=True)
    (tmp_path / "only_bad" / "images" / "a.png").write_bytes(b"")
    (tmp_path / "only_bad" / "captions.json").write_text(json.dumps({"a.png": "a caption"}))
    with pytest.raises(DatasetError, match=r"no usable images out of 1; first: images/a.png: zero-byte file"):
        load_training_examples(parse("--dataset_dir", str(tmp_path / "only_bad")))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DatasetError, match="cannot tell the dataset layout"):
        load_training_examples(parse("--dataset_dir", str(tmp_path / "nothing"), "--dataset_type", "auto"))


def test_kohya_and_metadata_orphans_and_bad_rows(tmp_path):
    kohya = tmp_path / "kohya"
    (kohya / "10_style").mkdir(parents=True)
    (kohya / "10_style" / "a.png").write_bytes(GOOD["good.png"])
    (kohya / "10_style" / "a.txt").write_text("a caption")
    (kohya / "10_style" / "b.png").write_bytes(GOOD["good.png"])
    (kohya / "c.txt").write_text("lonely caption")
    report = preflight.check(list_dataset("auto", kohya))
    assert [str(p) for p in report.problems] == [
        "c.txt: caption without image (no image file of the same name)",
        "10_style/b.png: image without caption (no 10_style/b.txt)"]
    assert [e.caption for e in report.examples] == ["a caption"]

    metadata = tmp_path / "metadata"
    metadata.mkdir()
    (metadata / "a.png").write_bytes(GOOD["good.png"])
    (metadata / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\nnot json\n'
                                             '{"file_name": "gone.png", "text": "lost"}\n')
    report = preflight.check(list_dataset("auto", metadata))
    assert [str(p) for p in report.problems] == [
        "metadata.jsonl line 2: not an object with a 'file_name' string",
        "gone.png: caption without image (file not found)"]


def test_check_dataset_command_exit_status_and_report(tmp_path, capsys):
    dataset = write_bad_corpus(tmp_path / "bad")
    result = run_in_process("utils/check_dataset.py", "--dataset_dir", str(dataset), check=False)
    assert result.returncode == 1, result.stderr
    for line in expected_problems():
        assert line in result.stdout.splitlines()
    assert "training would not start" in result.stdout
    assert check_dataset.main(["--dataset_dir", str(dataset), "--bad_image_policy", "skip"]) == 0
    good = write_ghibli(tmp_path / "good", CONTENT)
    capsys.readouterr()
    assert check_dataset.main(["--dataset_dir", str(good)]) == 0
    assert capsys.readouterr().out.startswith("3 of 3 entries usable, 0 problem(s) (ghibli dataset at ")


def test_converter_refuses_overlap_and_a_full_output(tmp_path):
    ghibli = write_ghibli(tmp_path / "ghibli", CONTENT)
    with pytest.raises(DatasetError, match="must not overlap"):
        convert(ghibli, "kohya", ghibli / "inside")
    out = convert(ghibli, "kohya", tmp_path / "out")
    with pytest.raises(DatasetError, match="not empty"):
        convert(ghibli, "metadata", out)
    convert(ghibli, "metadata", out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["gray.png", "hills.png", "metadata.jsonl", "set"]


def test_dataset_flags_keep_the_original_defaults():
    args = parse()
    assert (args.dataset_type, args.dataset_dir, args.bad_image_policy) == ("ghibli", "dataset_ghibli", "skip")
    assert (args.image_column, args.caption_column) == ("image", None)
    with pytest.raises(DatasetError, match="does not go with --dataset_type kohya"):
        load_training_examples(parse("--dataset_name", "x.parquet", "--dataset_type", "kohya"))


# ----------------------------------------------------------------------------- the original's product layout and Datasets


def test_a_missing_styled_image_or_product_image_is_named(tmp_path):
    dataset = write_product(tmp_path / "product", CONTENT)
    (dataset / "styled" / "item1.png").unlink()
    (dataset / "products" / "product_gray.png").unlink()
    report = preflight.check(list_dataset("product", dataset))
    assert sorted(map(str, report.problems)) == [
        "styled/item1.png: caption without image (file not found)",
        "styled/item2.png: product image products/product_gray.png not found"]
    assert [e.caption for e in report.examples] == ["rolling green hills in ghibli style"]
    result = run_in_process("utils/check_dataset.py", "--dataset_dir", str(dataset), check=False)
    assert result.returncode == 1 and "styled/item1.png: caption without image (file not found)" in result.stdout


def test_the_original_dataset_classes_yield_the_original_items(tmp_path):
    import inspect

    from torch.utils.data import Dataset

    for cls in (GhibliDataset, ProductImageDataset):
        assert issubclass(cls, Dataset)
        assert list(inspect.signature(cls).parameters)[:2] == ["dataset_dir", "transform"]
        assert inspect.signature(cls).parameters["transform"].default is None

    ghibli = GhibliDataset(write_ghibli(tmp_path / "ghibli", CONTENT))
    items = [ghibli[i] for i in range(len(ghibli))]
    assert all(set(item) == {"image", "text"} and item["image"].mode == "RGB" for item in items)
    by_text = {item["text"]: item["image"] for item in items}
    assert by_text["rolling green hills in ghibli style"].size == (96, 80)
    assert by_text["  a grey sky over a meadow \n"].size == (72, 72)  # grayscale source, RGB item

    product = ProductImageDataset(write_product(tmp_path / "product", CONTENT), transform=lambda image: image.size)
    assert len(product) == 3
    item = product[0]
    assert set(item) == {"image", "product_image", "text"}
    assert item == {"image": (96, 80), "product_image": (64, 64), "text": "rolling green hills in ghibli style"}
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "captions.json").write_text(json.dumps({"gone.png": "a cat"}))
    with pytest.raises(ValueError, match="no images with captions"):  # the original raised ValueError too
        GhibliDataset(empty)
