"""Every flag of the installed official TotalSegmentator CLI is known to totalseg-fast (issue 25, item 2): read
from totalsegmentator/bin/TotalSegmentator.py at test time, each spelling is registered with the official
meaning (a short form such as -fs is never split into -f -s), and each flag is either accepted or refused in
one line with exit 2."""
from __future__ import annotations

import ast
import contextlib
import hashlib
import io
from pathlib import Path

import nibabel as nib
import pytest

from common.cli.console import build_parser, main
from common.cli.official_flags import FLAGS


def _official_options() -> dict[str, str]:
    """Every option string of the official CLI -> its dest, from the installed source."""
    import totalsegmentator

    src = Path(totalsegmentator.__file__).parent / "bin" / "TotalSegmentator.py"
    options = {}
    for node in ast.walk(ast.parse(src.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")]
            dest = next((k.value.value for k in node.keywords if k.arg == "dest"), None)
            if dest is None:
                longs = [n for n in names if n.startswith("--")]
                dest = (longs[0] if longs else names[0]).lstrip("-").replace("-", "_")
            options.update({n: dest for n in names})
    return options


OFFICIAL = _official_options()


def test_every_official_spelling_is_registered_with_the_official_meaning():
    ours = build_parser()._option_string_actions
    longs = {n for n in OFFICIAL if n.startswith("--")}
    assert len(longs) >= 38, sorted(longs)
    missing = sorted(n for n in OFFICIAL if n not in ours)
    assert missing == []
    wrong = {n: (ours[n].dest, d) for n, d in OFFICIAL.items() if n != "--version" and ours[n].dest != d}
    assert wrong == {}


def test_official_short_forms_are_never_split_into_others():
    parser = build_parser()
    args = parser.parse_args(["-i", "ct.nii.gz", "-o", "segs", "--fast", "--ml", "-fs"])
    assert args.force_split and not args.statistics  # once read as -f -s: --statistics nobody asked for
    for short in [n for n in OFFICIAL if not n.startswith("--") and len(n) > 2]:
        action = parser._option_string_actions[short]
        assert action.dest == OFFICIAL[short], short



def _value(dest: str) -> list[str]:
    kwargs = FLAGS[dest].kwargs
    if kwargs.get("action") == "store_true" or kwargs.get("nargs") == "?":
        return []
    return {"model_size": ["small"], "test": ["1"], "resampling_order": ["3"], "output_type": ["dicom_seg"]}.get(
        dest, ["x"])


@pytest.mark.parametrize("dest", [d for d, f in FLAGS.items() if f.refusal is not None])
def test_each_refused_flag_gives_one_line_and_exit_2(dest, tmp_path, capsys):
    name = FLAGS[dest].names[0]
    with pytest.raises(SystemExit) as exc:
        main(["-i", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "segs"), name, *_value(dest)])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    (line,) = err.strip().splitlines()
    assert name in line and "Traceback" not in err
    assert not (tmp_path / "segs").exists()


def test_list_tasks_and_classes(capsys):
    from totalsegmentator.map_to_binary import class_map

    assert main(["-lt"]) == 0
    assert capsys.readouterr().out.startswith("total\t")
    assert main(["-lc"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{k}\t{v}" for k, v in sorted(class_map["total"].items())] and len(lines) == 117
    with pytest.raises(SystemExit) as exc:
        main(["-lc", "lung_vessels"])
    assert exc.value.code == 2 and "only the task total" in capsys.readouterr().err


def test_skip_saving_writes_statistics_only_and_leaves_the_masks_there(tmp_path, example_ct_sm, in_tiny_home,
                                                                        tiny_onnx_model):
    scan = tmp_path / "ct.nii.gz"
    nib.save(nib.load(example_ct_sm).slicer[40:80, 30:70, 0:24], scan)
    segs = tmp_path / "segs"
    base = ["-i", str(scan), "-o", str(segs), "--weights", "standin", "--onnx", str(tiny_onnx_model), "-q"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([*base, "-ss", "--statistics"]) == 0, err.getvalue()
    assert sorted(p.name for p in segs.iterdir()) == ["statistics.json"]
    stats = (segs / "statistics.json").read_text()
    assert '"liver"' in stats and '"volume"' in stats
    with contextlib.redirect_stderr(err):
        assert main(base) == 0
    masks = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in segs.glob("*.nii.gz")}
    assert len(masks) == 117
    with contextlib.redirect_stderr(err):
        assert main([*base, "-ss", "-s"]) == 0, err.getvalue()
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in segs.glob("*.nii.gz")} == masks
