#!/usr/bin/env python
"""Stage 02: get the Task 297 weights (official or seeded stand-in) and export the network to ONNX.

Works on any nnU-Net v2 results folder (--model-dir): the official Task 297, the stand-in, or your own
retrained model. Writes models/<name>.onnx (dynamic batch and spatial axes) and models/<name>.json with
the onnx.checker result and the PyTorch vs ONNX Runtime comparison on one full random patch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli.args import check_outputs, fail, nonnegative_int, run_script, script_parser
from common.cli.script_args import add_weights_argument
from common.core.errors import InputError
from common.core.paths import DEFAULT_ONNX
from common.inference.model_cache import ensure_onnx, onnx_variant_path, prepare_model


def fold_name(text: str) -> int | str:
    """argparse type: an nnU-Net fold, an integer >= 0 (folder fold_N) or "all" (folder fold_all)."""
    if text == "all":
        return text
    try:
        return nonnegative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 or 'all', not {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="nnU-Net v2 results folder (trainer__plans__config, holding plans.json, dataset.json, "
                        "fold_N/). Default: the Task 297 folder where TotalSegmentator keeps its weights")
    add_weights_argument(p)
    p.add_argument("--fold", type=fold_name, default=0, metavar="N|all",
                   help="fold to export: an integer >= 0 or 'all' (default 0)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"ONNX file to write (default {DEFAULT_ONNX.relative_to(DEFAULT_ONNX.parents[1])} for "
                        "Task 297, models/<dataset>.onnx otherwise)")
    p.add_argument("--standin-only", action="store_true",
                   help="only write the stand-in Task 297 weights folder (never replaces official weights)")
    p.add_argument("--force", action="store_true", help="re-export even if the ONNX file is up to date")
    p.add_argument("--native-norm", action="store_true",
                   help="export InstanceNorm as ONNX's fused InstanceNormalization (faster in ONNX Runtime but "
                        "less exact on large patches) instead of the default precise form; written to "
                        "<name>_nativenorm.onnx")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.out is not None and not args.standin_only:  # refused before the weights are touched
            target = onnx_variant_path(args.out, not args.native_norm)
            check_outputs(files=(target, target.with_suffix(".json")))
        if args.standin_only:
            from common.inference.weights import build_standin

            print(f"stand-in weights: {build_standin()}")
            return 0
        if args.model_dir is None:
            spec = prepare_model(args.weights)
            out = args.out or DEFAULT_ONNX
        else:
            from common.inference.model import load_model_spec

            spec = load_model_spec(args.model_dir, fold=args.fold)
            out = args.out or DEFAULT_ONNX.parent / f"{spec.folder.parent.name}.onnx"
        from common.inference.onnx_export import export_and_check

        precise = not args.native_norm
        if args.force or args.model_dir is not None:
            out = onnx_variant_path(out, precise)
            print(f"exporting {spec.folder} -> {out}")
            report = export_and_check(spec, out, precise_norm=precise)
        else:
            out = ensure_onnx(spec, out, precise_norm=precise)
            import json

            report = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    except (InputError, OSError, RuntimeError) as exc:  # OSError includes FileExistsError
        return fail(exc)
    par = report["parity"]
    print(f"ONNX model: {out} ({report['onnx_bytes'] / 1e6:.1f} MB, opset {report['opset']}, checker passed, "
          f"InstanceNorm: {report.get('instance_norm', 'native')})")
    print(f"weights: {report['model']['weights']} sha256 {report['model']['sha256'][:16]}…")
    print(f"PyTorch vs ONNX Runtime on one {tuple(par['patch_shape'])} patch: max |logit diff| "
          f"{par['max_abs_logit_diff']:.2e}, argmax agreement {par['argmax_agreement']:.6f}")
    print(f"report: {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
