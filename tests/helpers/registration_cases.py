"""Synthetic passports for the registration tests: ellipsoid structures with exactly known geometry (no CT data
needed), and the same anatomy moved rigidly into another frame; and the real CT case the harness uses (a CT and
its label map loaded once, its fixed passport, body points). World coordinates are mm, RAS+."""
from __future__ import annotations

import numpy as np

from common.imaging.geometry import voxel_to_world
from common.imaging.labels import total_class_names_if_installed
from common.records.passport import compute_structures
from common.records.passport_model import Structure
from registration.accuracy import BODY_HU
from registration.synthetic import ellipsoid_structure, model_labels

NAMES = ["vertebrae_L1", "vertebrae_L2", "vertebrae_L3", "vertebrae_T12", "sacrum", "hip_left", "hip_right",
         "rib_left_10", "rib_right_10", "liver", "spleen", "kidney_left", "kidney_right", "pancreas",
         "lung_lower_lobe_left", "lung_lower_lobe_right", "aorta", "stomach", "colon", "gallbladder"]


def make_passport(seed: int = 0, n_points: int = 300, names: list[str] = NAMES) -> list[Structure]:
    """A passport's structures (no scan behind them, so no Passport): ellipsoids with centroids, covariance
    eigen-decomposition (eigenvectors as columns, eigenvalues ascending), voxel counts and surface points, all
    in world mm."""
    rng = np.random.default_rng(seed)
    structures = []
    for i, name in enumerate(names):
        c = rng.uniform([-120, -100, -150], [120, 100, 150])
        radii = np.sort(rng.uniform(10, 50, size=3))
        Q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        d = rng.normal(size=(n_points, 3))
        structures.append(ellipsoid_structure(i + 1, name, c, radii, Q, d,
                                              voxel_count=int(4 / 3 * np.pi * np.prod(radii) / 27)))
    return structures


def moved_passport(passport: list[Structure], R: np.ndarray, t: np.ndarray,
                   flip_signs: bool = True) -> list[Structure]:
    """The structures of the same anatomy in a MOVING frame where x_fixed = R x_moving + t (centroids,
    eigenvectors and boundary points moved; the other fields kept).

    Eigenvector signs are flipped at random (a passport's signs carry no meaning)."""
    rng = np.random.default_rng(123)
    out = []
    for s in passport:
        to_m = lambda p: (p - t) @ R  # noqa: E731 - fixed -> moving
        vecs = R.T @ s.eigenvectors
        if flip_signs:
            vecs = vecs * rng.choice([-1.0, 1.0], size=3)
        out.append(s.replace(centroid_mm=to_m(s.centroid_mm), eigenvectors=vecs,
                             boundary_points_mm=to_m(s.boundary_points_mm)))
    return out



def model_block(**changes: object) -> dict:
    """A passport's ``model`` block as ModelSpec.provenance() writes it (stand-in weights of the fast model), with
    ``changes`` applied."""
    block = {"name": "Dataset297_TotalSegmentator_total_3mm_1559subj",
             "trainer_plans_config": "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres", "fold": 0,
             "weights": "standin", "sha256": "a" * 64, "folder": "/models/Dataset297/trainer",
             "standin": {"what": "seeded random weights", "seed": 0}}
    block.update(changes)
    if block["weights"] != "standin":
        block.pop("standin", None)
    return block


def passport_files(folder, fixed_model: dict, moving_model: dict, names=("A.json", "B.json")):
    """Fixed and moving passport files of one small label map (10 ellipsoids, 3 mm voxels) carrying the given
    ``model`` blocks; the moving grid is rotated 3 deg and shifted (world mm, RAS+)."""
    from common.records.passport import build_passport, save_passport
    from registration.synthetic import rotation_matrix

    rng = np.random.default_rng(0)
    shape = (40, 36, 32)
    lab = np.zeros(shape, dtype=np.uint8)
    ijk = np.indices(shape).reshape(3, -1).T
    for label in range(1, 11):
        c, r = rng.uniform(7, np.array(shape) - 7), rng.uniform(3, 6, size=3)
        lab.reshape(-1)[(((ijk - c) / r) ** 2).sum(axis=1) <= 1.0] = label
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    moved = np.eye(4)
    moved[:3, :3] = rotation_matrix([0.3, 0.1, 1.0], 3.0)
    moved[:3, 3] = [5.0, -3.0, 4.0]
    labels = {i: f"structure_{i}" for i in range(1, 11)}
    return tuple(save_passport(build_passport(lab, a, labels, scan={}, model=m, resolution="original"),
                               folder / name)
                 for a, m, name in ((aff, fixed_model, names[0]), (moved @ aff, moving_model, names[1])))


def real_ct_case(ct_path, seg_path) -> dict:
    """The harness's fixed scan from a real CT and its label map: image ``img``, label map ``anatomy`` and its
    smooth model ``lab`` (x, y, z), ``aff`` (voxel -> world mm), class ``names``, fixed passport ``fp``, body
    points ``body`` (n, 3) mm (HU > -500) and the scan ``center`` (3,) mm."""
    from registration.harness import load_ct_and_labels

    img, anatomy, aff = load_ct_and_labels(ct_path, seg_path)
    names = total_class_names_if_installed()
    lab = model_labels(anatomy)
    return {"img": img, "anatomy": anatomy, "lab": lab, "aff": aff, "names": names,
            "fp": compute_structures(lab, aff, names), "body": voxel_to_world(np.argwhere(img > BODY_HU), aff),
            "center": voxel_to_world((np.array(img.shape) - 1)[None] / 2.0, aff)[0]}
