"""Subtitle parsing: SRT and ASS, in the encodings real sidecars come in, and clear errors for the rest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cinecut.ingest import DialogueEvent, MissingInputError, SubtitleError, parse_subtitles
from cinecut.ingest.subtitles import decode_subtitle_bytes

SRT = """1
00:00:01,000 --> 00:00:02,500
Café – naïve “quotes”

3
00:00:10,000 --> 00:00:12,000
<i>Later</i> line

2
00:00:04,000 --> 00:00:05,000
Two
lines

4
00:00:06,000 --> 00:00:07,000
<i></i>
"""
EXPECTED = [
    DialogueEvent(1.0, 2.5, "Café – naïve “quotes”"),
    DialogueEvent(4.0, 5.0, "Two\nlines"),
    DialogueEvent(10.0, 12.0, "Later line"),
]

ASS = r"""[Script Info]
ScriptType: v4.00+

[V4+ Styles]
Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, MarginV, Encoding
Style: Default,Arial,20,&H00FFFFFF,&H000000FF,&H00000000,&H00000000,0,0,0,0,100,100,0,0,1,2,2,2,10,10,10,1

[Events]
Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text
Dialogue: 0,0:00:03.00,0:00:04.50,Default,,0,0,0,,{\i1}Hold it{\i0}\Nright there.
Comment: 0,0:00:05.00,0:00:06.00,Default,,0,0,0,,director's note
Dialogue: 0,0:00:01.00,0:00:02.00,Default,,0,0,0,,{\pos(10,10)}First
Dialogue: 0,0:00:07.00,0:00:08.00,Default,,0,0,0,,{\fad(100,100)}
"""


def test_srt_from_the_synthetic_film(synthetic_film_template):
    events = parse_subtitles(synthetic_film_template.subtitle)
    assert [(e.start_s, e.end_s, e.text) for e in events] == list(synthetic_film_template.events)
    assert events[0].midpoint_s == pytest.approx((events[0].start_s + events[0].end_s) / 2)


def test_srt_sorted_tags_removed_empty_skipped(tmp_path: Path):
    p = tmp_path / "a.srt"
    p.write_text(SRT, encoding="utf-8")
    assert parse_subtitles(p) == EXPECTED


def test_ass_skips_comments_and_empty_lines(tmp_path: Path):
    p = tmp_path / "a.ass"
    p.write_text(ASS, encoding="utf-8")
    assert parse_subtitles(p) == [
        DialogueEvent(1.0, 2.0, "First"),
        DialogueEvent(3.0, 4.5, "Hold it\nright there."),
    ]


def test_ass_content_under_srt_extension(tmp_path: Path):
    p = tmp_path / "mislabelled.srt"
    p.write_text(ASS, encoding="utf-8")
    assert len(parse_subtitles(p)) == 2


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-16-le", "cp1252"])
def test_encodings(tmp_path: Path, encoding: str):
    data = SRT.replace("\n", "\r\n").encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data  # with BOM
    p = tmp_path / f"{encoding}.srt"
    p.write_bytes(data)
    assert parse_subtitles(p) == EXPECTED


def test_undecodable_utf8_falls_back_to_latin1():
    text, enc = decode_subtitle_bytes(b"1\n00:00:01,000 --> 00:00:02,000\nna\x81ve\n")
    assert enc == "latin-1" and "na\x81ve" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty subtitle file"),
        (b"  \n\n", "empty subtitle file"),
        (b"just some notes\nnot subtitles\n", "not a subtitle file"),
        (bytes(range(256)) * 8, "binary data"),
    ],
)
def test_garbage_is_a_clear_error(tmp_path: Path, content: bytes, message: str):
    p = tmp_path / "bad.srt"
    p.write_bytes(content)
    with pytest.raises(SubtitleError, match=message) as err:
        parse_subtitles(p)
    assert str(p) in str(err.value) and err.value.exit_code == 65


def test_a_film_given_as_subtitles(synthetic_film_template):
    with pytest.raises(SubtitleError):
        parse_subtitles(synthetic_film_template.video)


def test_missing_file(tmp_path: Path):
    with pytest.raises(MissingInputError):
        parse_subtitles(tmp_path / "none.srt")


def test_pysubs2_is_imported_lazily():
    code = (
        "import sys, cinecut.ingest, cinecut.ingest.subtitles, cinecut.ingest.keyframes\n"
        "assert 'pysubs2' not in sys.modules, 'pysubs2 imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
