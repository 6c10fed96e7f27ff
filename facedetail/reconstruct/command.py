"""``facedetail reconstruct PHOTO… -o OUT``: command line over :class:`~facedetail.reconstruct.photo.Reconstructor`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import typer

from facedetail.errors import FacedetailError

DeviceName = Literal["auto", "cpu", "cuda"]


def photo_list(paths: list[Path]) -> list[Path]:
    """Files as given; a folder stands for the image files in it (sorted, recursive, as ``wild_proxy`` lists them)."""
    from facedetail.proxy.inputs import list_inputs

    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(item.path for item in list_inputs(p))
        else:
            out.append(p)
    return out


def _line(photo: Path, text: str) -> str:
    # A file name that is not valid UTF-8 must not crash the print: show its bytes escaped.
    shown = str(photo).encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{shown}: {text}"


def reconstruct_command(
    photos: Annotated[list[Path], typer.Argument(help="photos (jpg, png, ...) or folders of photos")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder: one sub-folder per face")] = Path(
        "reconstructions"),
    model: Annotated[Path, typer.Option(help="morphable model (face_model stage)")] = Path("data/face_model/model.npz"),
    dictionary: Annotated[Path, typer.Option(help="expression dictionary (dictionary stage)")] = Path(
        "data/dictionary"),
    detail_net: Annotated[Path, typer.Option(help="detail network (train_detail stage)")] = Path(
        "data/train_detail/detail_net.safetensors"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    all_faces: Annotated[bool, typer.Option("--all-faces", help="reconstruct every face of a photo")] = False,
    levels: Annotated[int, typer.Option(help="midpoint subdivisions of detailed.obj (3: 216,192 vertices)")] = 3,
    sigma: Annotated[float, typer.Option(help="stitching σ as a fraction of the patch (release: 50/256)")] = 50 / 256,
    stride: Annotated[int, typer.Option(help="patch stride in texels; 0 = the training stride")] = 0,
    viewer: Annotated[bool, typer.Option(help="write view.html (the mesh embedded, 12.5 MB at 3 levels)")] = True,
    min_face_px: Annotated[float, typer.Option(help="smaller faces (box side, photo pixels) are refused")] = 40.0,
    max_fit_nme: Annotated[float, typer.Option(
        help="a fit whose NME (mean landmark error / outer-eye-corner distance) ends above this has diverged")] = 0.2,
) -> None:
    """One photo in, a detailed 3D face out: proxy, displacement (mm), detailed mesh (OBJ, glTF), preview, viewer.

    One summary line per photo (its timings or the reason it failed); exit code 1 when any photo failed.
    """
    from tqdm import tqdm

    from facedetail.features.landmarks import SEVERAL_FACES
    from facedetail.reconstruct.detailnet import StitchConfig
    from facedetail.reconstruct.photo import STEPS, Failure, ReconstructConfig, Reconstructor, output_names
    from facedetail.reconstruct.photo import resolve_device as pick_device

    if device not in ("auto", "cpu", "cuda"):
        typer.echo(f"error: --device must be auto, cpu or cuda, not {device!r}", err=True)
        raise typer.Exit(2)
    try:
        base = ReconstructConfig()
        config = ReconstructConfig(all_faces=all_faces, subdivision_levels=levels, viewer=viewer,
                                   stitch=StitchConfig(sigma_fraction=sigma, stride=stride or None),
                                   detector={**base.detector.model_dump(), "min_face_px": min_face_px},
                                   fit={**base.fit.model_dump(), "max_nme": max_fit_nme})
        torch_device = pick_device(device)  # type: ignore[arg-type]
        started = time.perf_counter()
        engine = Reconstructor(model, dictionary, detail_net, config, torch_device)
    except (FacedetailError, RuntimeError, ValueError) as err:
        typer.echo(f"error: {' '.join(str(err).split())}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"models loaded in {time.perf_counter() - started:.1f} s ({torch_device.type})", err=True)
    listed = photo_list(photos)
    failed = 0
    try:
        for photo, name in tqdm(list(zip(listed, output_names(listed), strict=True)), desc="reconstruct",
                                unit="photo", file=sys.stderr, disable=None):
            t0 = time.perf_counter()
            try:
                results = engine.reconstruct(photo, name)
            except Exception as err:  # one photo must never lose the others: report it in one line
                results = [Failure(photo, f"internal error: {type(err).__name__}: {' '.join(str(err).split())}")]
            for result in results:
                if isinstance(result, Failure):
                    failed += 1
                    hint = " (use --all-faces)" if result.reason.startswith(SEVERAL_FACES) else ""
                    tqdm.write(_line(photo, f"failed: {result.reason}{hint}"))
                    continue
                try:
                    engine.write(result, out)
                except Exception as err:  # a full disk or an unwritable folder: this face failed, go on
                    failed += 1
                    tqdm.write(_line(photo, f"failed: writing {out / result.name}: {type(err).__name__}: {err}"))
                    continue
                steps = ", ".join(f"{k} {result.seconds.get(k, 0.0):.2f}" for k in STEPS)
                tqdm.write(_line(photo, f"ok -> {out / result.name} ({result.maps.patches} patches; {steps} s; "
                                        f"total {time.perf_counter() - t0:.2f} s)"))
    finally:
        engine.close()
    if failed:
        typer.echo(f"{failed} of the faces or photos failed", err=True)
        raise typer.Exit(1)
