"""Captioning with the real google-genai client against a Gemini-compatible server on 127.0.0.1."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.fakes.gemini_server import GeminiServer
from tests.helpers import read_json as read, wait_for
from utils import creat_text_caption
from utils.core.cli import run_cli
from utils.data.caption_job import cut_at_word, encode_image, shape_caption
from utils.data.captioner import CaptionError, CaptionFailure, GeminiCaptioner, RetryPolicy, parse_retry_after

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key-Zq81xVv0-do-not-print"
COLORS = [(230, 40, 40), (40, 200, 60), (40, 60, 220), (220, 200, 40), (200, 40, 200),
          (40, 200, 200), (120, 120, 120), (250, 150, 60)]
GENERATE = re.compile(r"^/v1(beta)?/models/gemini-2\.5-flash:generateContent$")
ORIGINAL_PROMPT = "Describe the input image in 1\u20132 sentences. Make sure to mention that the image is in 'Ghibli style'."


def make_images(folder: Path, count: int, size: tuple[int, int] = (96, 64)) -> dict[str, tuple[int, int, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for index, color in enumerate(COLORS[:count]):
        name = f"img_{index:02d}.png"
        Image.new("RGB", size, color).save(folder / name)
        names[name] = color
    return names


def color_in(caption: str) -> tuple[int, int, int]:
    match = re.search(r"rgb (\d+) (\d+) (\d+)", caption)
    assert match, caption
    return tuple(int(value) for value in match.groups())


def close(a: tuple[int, ...], b: tuple[int, ...], tolerance: int = 6) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


def image_of(color: tuple[int, int, int] | None, images: dict[str, tuple[int, int, int]]) -> str:
    matches = [name for name, source in images.items() if color is not None and close(color, source)]
    assert len(matches) == 1, (color, matches)
    return matches[0]


def prompt_of(request) -> str:
    """The text sent with the image."""
    return " ".join(part["text"] for content in request.body["contents"] for part in content["parts"] if "text" in part)


@pytest.fixture
def server():
    with GeminiServer() as running:
        yield running


@pytest.fixture
def key_env(monkeypatch, server):
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    monkeypatch.setenv("GEMINI_BASE_URL", server.base_url)


def cli_env(server: GeminiServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOOGLE_API_KEY", "GEMINI_API_KEY")}
    env.update(GEMINI_BASE_URL=server.base_url, PYTHONUNBUFFERED="1", **extra)
    return env


def caption_cli(argv: list[str]) -> int:
    """utils/creat_text_caption.py in-process, through the runner every command uses."""
    return run_cli(lambda: creat_text_caption.main(argv))


def caption_command(image_dir: Path, output: Path, *flags: str) -> list[str]:
    return [sys.executable, str(REPO / "utils" / "creat_text_caption.py"), "--image-dir", str(image_dir),
            "--output", str(output), "--no_progress", *flags]


def test_every_image_captioned_downscaled_with_trigger_words(tmp_path, server, key_env, capsys):
    images = make_images(tmp_path / "images", 5, size=(300, 200))
    output = tmp_path / "captions.json"

    code = caption_cli(["--image-dir", str(tmp_path / "images"), "--output", str(output),
                                   "--workers", "3", "--max_image_side", "64", "--prefix", "ghbl,",
                                   "--suffix", "(anime)", "--no_progress"])

    assert code == 0
    captions = read(output)
    assert sorted(captions) == sorted(images)
    for name, caption in captions.items():
        assert caption.startswith("ghbl, ") and caption.endswith(" (anime)")
        assert close(color_in(caption), images[name])
    assert len(server.requests) == 5
    for request in server.requests:
        assert GENERATE.match(request.path), request.path
        assert request.headers["x-goog-api-key"] == KEY
        assert request.mime_type == "image/jpeg"
        assert request.image_size == (64, 43)  # 300x200 scaled to a longest side of 64
        assert request.body["generationConfig"]["temperature"] == 0.5
    assert "captioned 5, already had a caption 0, failed 0" in capsys.readouterr().out


def test_retry_honours_retry_after_and_retry_info(tmp_path, server):
    make_images(tmp_path, 1)
    jpeg = encode_image(tmp_path / "img_00.png", 64)
    server.fail_next(1, status=429, headers={"Retry-After": "1"})
    server.fail_next(1, status=429, retry_delay="0.3s")
    server.fail_next(1, status=503)
    captioner = GeminiCaptioner(api_key=KEY, base_url=server.base_url, timeout=10,
                                retry=RetryPolicy(max_retries=3, base_delay=0.01))

    caption = captioner.caption(jpeg)

    assert close(color_in(caption), COLORS[0])
    assert [r.status for r in server.requests] == [429, 429, 503, 200]
    times = [r.time for r in server.requests]
    assert times[1] - times[0] >= 1.0  # the Retry-After header was waited out
    assert times[2] - times[1] >= 0.3  # so was the RetryInfo body


def test_timeout_is_retried_and_permanent_errors_are_not(tmp_path, server):
    make_images(tmp_path, 1)
    jpeg = encode_image(tmp_path / "img_00.png", 64)
    captioner = GeminiCaptioner(api_key=KEY, base_url=server.base_url, timeout=0.3,
                                retry=RetryPolicy(max_retries=2, base_delay=0.01))

    server.fail_next(1, stall=1.0)
    assert close(color_in(captioner.caption(jpeg)), COLORS[0])
    assert len(server.requests) == 2

    server.reset()
    server.fail_next(1, status=400, message="image too strange")
    with pytest.raises(CaptionFailure, match="HTTP 400 INVALID_ARGUMENT: image too strange"):
        captioner.caption(jpeg)
    assert len(server.requests) == 1

    server.reset()
    server.fail_next(3, status=500)
    with pytest.raises(CaptionFailure, match="HTTP 500 .*after 3 attempts"):
        captioner.caption(jpeg)
    assert len(server.requests) == 3


def test_failures_are_summarised_and_rerun_captions_only_the_missing(tmp_path, server, key_env, capsys):
    images = make_images(tmp_path / "images", 3)
    output = tmp_path / "captions.json"
    argv = ["--image-dir", str(tmp_path / "images"), "--output", str(output), "--workers", "1",
            "--max_retries", "0", "--no_progress"]
    server.fail_next(1, status=403, message="quota project not allowed")

    assert caption_cli(argv) == 1
    out = capsys.readouterr().out
    assert "captioned 2, already had a caption 0, failed 1" in out
    assert "failed img_00.png: HTTP 403 PERMISSION_DENIED: quota project not allowed" in out
    assert sorted(read(output)) == ["img_01.png", "img_02.png"]

    server.reset()
    assert caption_cli(argv) == 0
    assert [image_of(r.color, images) for r in server.requests] == ["img_00.png"]
    assert sorted(read(output)) == sorted(images)
    assert "captioned 1, already had a caption 2, failed 0" in capsys.readouterr().out

    server.reset()
    before = read(output)
    assert caption_cli(argv + ["--overwrite", "--prefix", "again"]) == 0
    assert len(server.requests) == 3
    assert all(read(output)[name] == "again " + caption for name, caption in before.items())


def test_killed_run_resumes_and_captions_each_image_once(tmp_path, server):
    images = make_images(tmp_path / "images", 8)
    output = tmp_path / "captions.json"
    command = caption_command(tmp_path / "images", output, "--workers", "2")
    server.pause_after(3)  # three captions, then the server holds every answer
    process = subprocess.Popen(command, env=cli_env(server, GEMINI_API_KEY=KEY),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: output.exists() and len(read(output)) == 3 and server.held == 2, 30,
             "three captions saved and two requests in flight", process)
    process.kill()  # SIGKILL while two requests are in flight: no chance to clean up
    first_log = process.communicate()[0]

    saved = read(output)  # still whole, valid JSON
    assert len(saved) == 3
    first_requests = [image_of(r.color, images) for r in server.requests]
    assert len(first_requests) == len(set(first_requests)) == 5

    server.resume()
    server.reset()
    rerun = subprocess.run(command, env=cli_env(server, GEMINI_API_KEY=KEY), capture_output=True, text=True,
                           timeout=60)

    assert rerun.returncode == 0, rerun.stderr
    second_requests = [image_of(r.color, images) for r in server.requests]
    assert sorted(second_requests) == sorted(set(images) - set(saved))  # only the missing, once each
    final = read(output)
    assert sorted(final) == sorted(images)
    assert all(final[name] == caption for name, caption in saved.items())
    assert all(close(color_in(caption), images[name]) for name, caption in final.items())
    assert KEY not in first_log + rerun.stdout + rerun.stderr


def test_ctrl_c_saves_the_request_in_flight_and_stops(tmp_path, server):
    images = make_images(tmp_path / "images", 8)
    output = tmp_path / "captions.json"
    server.pause_after(2)
    command = caption_command(tmp_path / "images", output, "--workers", "1")
    # Python ignores SIGINT if it starts with SIGINT ignored (a background job of a shell without
    # job control, as some CI runners are); restore Ctrl-C's usual effect before running the script.
    launcher = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", launcher, *command[1:]],
                               env=cli_env(server, GEMINI_API_KEY=KEY), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(process.stderr), daemon=True)
    reader.start()
    wait_for(lambda: output.exists() and len(read(output)) == 2 and server.held == 1, 30,
             "two captions saved and one request in flight", process)
    process.send_signal(signal.SIGINT)
    wait_for(lambda: any("waiting for 1 request(s) in flight" in line for line in log), 30,
             "the captioner to wait for its request in flight", process)
    server.resume()
    process.wait(timeout=30)
    reader.join(timeout=10)

    assert process.returncode == 130
    assert sorted(read(output)) == sorted(images)[:3]  # the third arrived after Ctrl-C and was kept
    assert len(server.requests) == 3  # nothing new was sent after Ctrl-C
    assert any("interrupted: 3 captions are saved" in line for line in log)


def test_original_defaults_and_key_file_and_the_key_is_never_shown(tmp_path, server):
    """No flags, in a folder laid out as the original expects: ghibli_2/ -> ghibli_2_captions.json,
    the key from vault/key.yaml's google_api_key, the original's prompt and temperature 0.5."""
    images = make_images(tmp_path / "ghibli_2", 3)
    (tmp_path / "vault").mkdir()
    (tmp_path / "vault" / "key.yaml").write_text(f"google_api_key: {KEY}\nother_service: unrelated\n")
    # A server that echoes the key in an error message must not get it printed either.
    server.fail_next(1, status=400, message=f"API key {KEY} not valid")
    command = [sys.executable, str(REPO / "utils" / "creat_text_caption.py"), "--no_progress", "--workers", "1",
               "--max_retries", "0"]

    run = subprocess.run(command, env=cli_env(server), cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert run.returncode == 1
    assert {r.headers["x-goog-api-key"] for r in server.requests} == {KEY}
    assert {prompt_of(r) for r in server.requests} == {ORIGINAL_PROMPT}
    assert {r.body["generationConfig"]["temperature"] for r in server.requests} == {0.5}
    assert "failed img_00.png: HTTP 400 INVALID_ARGUMENT: API key *** not valid" in run.stdout
    output = tmp_path / "ghibli_2_captions.json"
    assert sorted(read(output)) == ["img_01.png", "img_02.png"]
    assert all(close(color_in(caption), images[name]) for name, caption in read(output).items())
    shown = run.stdout + run.stderr + output.read_text()
    assert KEY not in shown and KEY[:12] not in shown


def test_key_file_google_api_key_is_used_when_no_environment_variable(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    assert creat_text_caption.load_api_key() is None  # no key anywhere: None, as the original
    assert "no Gemini API key" in caplog.text

    (tmp_path / "vault").mkdir()
    key_file = tmp_path / "vault" / "key.yaml"
    key_file.write_text(f"google_api_key: {KEY}\n")
    assert creat_text_caption.load_api_key() == KEY
    monkeypatch.setenv("GEMINI_API_KEY", "from-the-environment")  # the environment keeps priority
    assert creat_text_caption.load_api_key() == "from-the-environment"
    monkeypatch.delenv("GEMINI_API_KEY")

    key_file.write_text(f"key: {KEY}\n")  # this project's earlier field is still read
    assert creat_text_caption.load_api_key() == KEY
    key_file.write_text(f"api_key: {KEY}\n")
    caplog.clear()
    assert creat_text_caption.load_api_key() is None
    assert "vault/key.yaml: no 'google_api_key' field" in caplog.text and KEY not in caplog.text


def test_original_functions_caption_through_gemini(tmp_path, server, key_env):
    images = make_images(tmp_path / "images", 3)
    output = tmp_path / "out" / "captions.json"

    captions = creat_text_caption.process_images(str(tmp_path / "images"), "Say the colour.", str(output), 0.3)

    assert captions == read(output) and sorted(captions) == sorted(images)
    assert all(close(color_in(caption), images[name]) for name, caption in captions.items())
    assert {prompt_of(r) for r in server.requests} == {"Say the colour."}
    assert {r.body["generationConfig"]["temperature"] for r in server.requests} == {0.3}

    server.reset()
    caption = creat_text_caption.generate_caption(tmp_path / "images" / "img_01.png", "Describe it.")
    assert close(color_in(caption), COLORS[1]) and caption == caption.strip()
    assert server.requests[0].body["generationConfig"]["temperature"] == 0.9  # the original's default

    server.reset()
    server.fail_next(1, status=400, message="bad image")
    assert creat_text_caption.generate_caption(tmp_path / "images" / "img_01.png", "Describe it.") is None

    server.reset()
    creat_text_caption.process_images(tmp_path / "images", "Say the colour.", output, model="gemini-2.0-flash",
                                      overwrite=True)
    assert {r.path.rsplit("/", 1)[-1] for r in server.requests} == {"gemini-2.0-flash:generateContent"}

    empty = tmp_path / "empty"
    empty.mkdir()
    assert creat_text_caption.process_images(empty, "x") == {}  # logged, nothing written, as the original


def test_original_functions_without_a_key_raise_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    make_images(tmp_path / "images", 1)
    with pytest.raises(CaptionError, match="no Gemini API key"):
        creat_text_caption.process_images(tmp_path / "images", "x", tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


def test_bad_input_gives_one_line_errors(tmp_path, server, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no vault/key.yaml here
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_BASE_URL", server.base_url)
    empty = tmp_path / "empty"
    empty.mkdir()
    make_images(tmp_path / "images", 1)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")

    cases = [
        (["--image-dir", str(tmp_path / "missing")], "missing: image directory not found"),
        (["--image-dir", str(empty)], "empty: no images found"),
        (["--image-dir", str(tmp_path / "images")], "no Gemini API key"),
    ]
    for argv, expected in cases:
        assert caption_cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err

    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    assert caption_cli(["--image-dir", str(tmp_path / "images"), "--output", str(corrupt)]) == 2
    assert "corrupt.json: existing captions file is unreadable" in capsys.readouterr().err
    assert corrupt.read_text() == "{not json"  # left alone
    assert server.requests == []


def test_encode_image_applies_exif_orientation_and_flattens_alpha(tmp_path):
    source = Image.new("RGBA", (80, 40), (0, 0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown as 40 wide, 80 tall
    source.save(tmp_path / "turned.png", exif=exif)

    encoded = Image.open(io.BytesIO(encode_image(tmp_path / "turned.png", 20)))

    assert encoded.format == "JPEG" and encoded.mode == "RGB"
    assert encoded.size == (10, 20)
    assert min(encoded.getpixel((5, 10))) > 240  # transparent pixels become white, not black
    with pytest.raises(CaptionFailure, match="cannot read image"):
        (tmp_path / "broken.png").write_bytes(b"not an image")
        encode_image(tmp_path / "broken.png", 20)


def test_caption_length_cap_keeps_whole_words_and_trigger_words():
    text = '  "A quiet village   beside a river at sunset, in Ghibli style."  '
    assert shape_caption(text) == "A quiet village beside a river at sunset, in Ghibli style."
    capped = shape_caption(text, prefix="ghbl,", suffix="[end]", max_length=30)
    assert len(capped) <= 30
    assert capped == "ghbl, A quiet village [end]"  # 18 characters left for the text, cut before "beside"
    assert cut_at_word("abcdefghij", 4) == "abcd"  # one long word is cut hard
    assert cut_at_word("short", 10) == "short"


def test_parse_retry_after_reads_seconds_and_dates():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after(later) <= 31
