"""Data sources and the shared 2D slice pipeline.

Every data source (the embedded phantoms, the ACDC release layout, an MSD-style datalist) produces a list of
volume records ``{"image": path, "label": path, "case": name}``. :class:`SliceDataset` then runs the volume-level
preprocessing once, cuts every volume into 2D slices and numbers them: the slice number (``id``) is the index of the
slice in a fixed ordering (datalist order, then slice index), so it does not depend on shuffling, caching, workers or
samplers. Training state that is kept per sample (pseudo-labels, Clean/Noisy verdicts) is indexed by that number.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset, get_track_meta, set_track_meta
from monai.transforms import apply_transform

from scripts.flags import as_flag
from scripts.ignore_index import IGNORE_INDEX
from scripts.losses import ALL_CLASS_BITS, class_bits
from scripts.noise import oracle_labels, simulate_label_noise
from scripts.phantom import METADATA_FILE

logger = logging.getLogger(__name__)

__all__ = ["empty_end_runs", "acdc_datalist", "msd_datalist", "flat_datalist", "datalist", "dataset_layout",
           "resolve_dataset", "list_volumes", "check_volumes", "SliceDataset", "check_files", "noise_for_phantoms",
           "spread_subjects"]

LABEL_SUFFIX = "_gt.nii.gz"


def check_files(records: Sequence[dict], keys: Sequence[str] = ("image", "label")) -> list[dict]:
    """Fail early, naming the file, when a datalist points at something that is not there."""
    if len(records) == 0:
        raise ValueError("the datalist is empty: no volumes to load (check dataset_dir and the split).")
    for rec in records:
        for key in keys:
            if key not in rec:
                raise KeyError(f"datalist entry {rec} has no '{key}' key (expected keys: {list(keys)}).")
            path = Path(rec[key])
            if not path.is_file():
                raise FileNotFoundError(f"{key} file not found: {path}")
    return list(records)


def _split_cases(cases: list[str], split: str, splits_file: str | None, val_fraction: float, seed: int) -> list[str]:
    if split == "all":
        return cases
    if splits_file:
        path = Path(splits_file)
        if not path.is_file():
            raise FileNotFoundError(f"splits file not found: {path}")
        splits = json.loads(path.read_text())
        if split not in splits:
            raise KeyError(f"split '{split}' not in {path} (it has: {sorted(splits)})")
        chosen = list(splits[split])
        unknown = sorted(set(chosen) - set(cases))
        if unknown:
            raise FileNotFoundError(f"{path} names cases with no volumes in the data folder: {unknown[:5]}")
        return chosen
    shuffled = list(cases)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(val_fraction * len(shuffled))) if len(shuffled) > 1 else 0
    chosen = shuffled[:n_val] if split == "val" else shuffled[n_val:]
    return sorted(chosen)


def acdc_datalist(
    root: str,
    split: str = "train",
    splits_file: str | None = "auto",
    val_fraction: float = 0.125,
    seed: int = 0,
    with_label: bool = True,
) -> list[dict]:
    """Volumes of a folder in the ACDC release layout (``patientNNN/patientNNN_frameNN[_gt].nii.gz``).

    ``splits_file="auto"`` uses ``<root>/splits.json`` when it exists and a seeded split otherwise; ``None`` forces
    the seeded split; ``split="all"`` returns every case.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"data folder not found: {base}")
    if splits_file == "auto":
        splits_file = str(base / "splits.json") if (base / "splits.json").is_file() else None
    cases = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name.startswith("patient"))
    if not cases:
        raise FileNotFoundError(f"no patientNNN folders in {base}: is it in the ACDC release layout?")
    records = []
    for case in _split_cases(cases, split, splits_file, val_fraction, seed):
        frames = sorted(f for f in (base / case).glob(f"{case}_frame[0-9][0-9].nii.gz"))
        if not frames:
            raise FileNotFoundError(f"no {case}_frameNN.nii.gz image in {base / case}")
        for image in frames:
            rec = {"image": str(image), "case": image.name[: -len(".nii.gz")]}
            if with_label:
                rec["label"] = str(image.with_name(image.name.replace(".nii.gz", "_gt.nii.gz")))
            records.append(rec)
    return check_files(records, ("image", "label") if with_label else ("image",))


def msd_datalist(
    dataset_json: str,
    split: str = "train",
    val_fraction: float = 0.2,
    seed: int = 0,
    section: str = "training",
    with_label: bool = True,
) -> list[dict]:
    """Volumes of an MSD-style ``dataset.json``; paths in it are relative to the file's folder.

    A ``"validation"`` section in the file is used for ``split="val"``; without one, a seeded split of ``section``.
    """
    path = Path(dataset_json)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if section not in content:
        raise KeyError(f"{path} has no '{section}' section (it has: {sorted(content)})")
    keys = ("image", "label") if with_label else ("image",)

    def resolve(entries):
        out = []
        for entry in entries:
            if not isinstance(entry, dict) or "image" not in entry:
                raise KeyError(f"{path}: entry {entry!r} has no 'image' key")
            if with_label and "label" not in entry:
                raise KeyError(f"{path}: entry {entry!r} has no 'label' key")
            rec = {k: str((path.parent / entry[k]).resolve()) for k in keys}
            rec["case"] = Path(entry["image"]).name.split(".nii")[0]
            out.append(rec)
        return out

    if split == "val" and "validation" in content:
        return check_files(resolve(content["validation"]), keys)
    records = resolve(content[section])
    if split in ("train", "val") and "validation" not in content:
        names = _split_cases([r["case"] for r in records], split, None, val_fraction, seed)
        records = [r for r in records if r["case"] in set(names)]
    return check_files(records, keys)


def dataset_layout(root: str | Path) -> str:
    """Which of the layouts the bundle reads ``root`` is in: ``"acdc"`` (``patientNNN/`` folders), ``"msd"`` (a
    ``dataset.json``, or a folder holding one) or ``"flat"`` (``*.nii.gz`` volumes directly in the folder, labels
    named ``<image>_gt.nii.gz``). A missing path, an empty folder or a folder of anything else is an error naming it.
    """
    base = Path(root).expanduser()
    if base.is_file():
        if base.suffix == ".json":
            return "msd"
        raise ValueError(f"dataset {base} is a file but not a dataset.json")
    if not base.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {base}")
    if (base / "dataset.json").is_file():
        return "msd"
    if any(p.is_dir() and p.name.startswith("patient") for p in base.iterdir()):
        return "acdc"
    if any(base.glob("*.nii.gz")):
        return "flat"
    what = "is empty" if not any(base.iterdir()) else "holds no NIfTI volumes in a layout the bundle reads"
    raise FileNotFoundError(
        f"dataset folder {base} {what}: expected patientNNN/ folders (ACDC release layout), a dataset.json "
        f"(MSD style) or *.nii.gz volumes with *{LABEL_SUFFIX} labels beside them"
    )


def resolve_dataset(dataset_dir: str | Path, default_dir: str | Path) -> Path:
    """The data folder (or ``dataset.json``) a run reads.

    The bundle's own default folder gets the embedded phantoms generated on first use; any other path must already
    hold data in one of the layouts of :func:`dataset_layout`, and nothing is ever written into it, so a mistyped
    ``--dataset_dir`` fails instead of training on phantoms written there.
    """
    path = Path(dataset_dir).expanduser()
    if path.absolute() == Path(default_dir).expanduser().absolute():
        from scripts.phantom import ensure_phantom_dataset

        return ensure_phantom_dataset(path)
    dataset_layout(path)
    return path


def flat_datalist(root: str, split: str = "train", splits_file: str | None = "auto", val_fraction: float = 0.125,
                  seed: int = 0, with_label: bool = True) -> list[dict]:
    """Volumes directly in ``root``: ``<name>.nii.gz`` images with ``<name>_gt.nii.gz`` labels beside them."""
    base = Path(root)
    images = sorted(p for p in base.glob("*.nii.gz") if not p.name.endswith(LABEL_SUFFIX))
    if not images:
        raise FileNotFoundError(f"no *.nii.gz image volumes in {base}")
    by_case = {p.name[: -len(".nii.gz")]: p for p in images}
    if splits_file == "auto":
        splits_file = str(base / "splits.json") if (base / "splits.json").is_file() else None
    records = []
    for case in _split_cases(sorted(by_case), split, splits_file, val_fraction, seed):
        rec = {"image": str(by_case[case]), "case": case}
        if with_label:
            rec["label"] = str(base / f"{case}{LABEL_SUFFIX}")
        records.append(rec)
    return check_files(records, ("image", "label") if with_label else ("image",))


def datalist(root: str, split: str = "train", splits_file: str | None = "auto", seed: int = 0,
             with_label: bool = True) -> list[dict]:
    """The labelled volumes of ``split`` (``train``, ``val`` or ``all``) of a data set in any layout the bundle
    reads (:func:`dataset_layout`)."""
    layout = dataset_layout(root)
    if layout == "msd":
        path = Path(root)
        return msd_datalist(str(path if path.is_file() else path / "dataset.json"), split, seed=seed,
                            section="training", with_label=with_label)
    if layout == "acdc":
        return acdc_datalist(root, split, splits_file, seed=seed, with_label=with_label)
    return flat_datalist(root, split, splits_file, seed=seed, with_label=with_label)


def spread_subjects(records: Sequence[dict], count: int) -> list[dict]:
    """The volumes of ``count`` subjects spaced evenly through ``records``, all volumes of each.

    A small training set for a profile that trains long on few subjects: taking the first subjects instead would
    take one pathology group of ACDC, whose patients are numbered by group. A subject is the part of a record's
    ``case`` before ``_frame`` (ACDC holds two frames per patient), else the whole case name."""
    subjects: dict[str, list[dict]] = {}
    for rec in records:
        subjects.setdefault(str(rec.get("case", rec["image"])).split("_frame")[0], []).append(rec)
    names = list(subjects)
    if not 1 <= count <= len(names):
        raise ValueError(f"cannot take {count} subjects from a list of {len(names)}")
    picked = [names[i * len(names) // count] for i in range(count)]
    return [rec for name in picked for rec in subjects[name]]


def list_volumes(folder: str, pattern: str = "*.nii.gz", exclude: str = LABEL_SUFFIX) -> list[dict]:
    """Every image volume of a data set, for inference where there are no labels: the images of a
    ``dataset.json`` (training and validation sections), or every ``*.nii.gz`` under a folder (recursively) that is
    not a ``*_gt.nii.gz`` label."""
    base = Path(folder)
    if base.is_file() and base.suffix == ".json":
        return _msd_images(base)
    if not base.is_dir():
        raise FileNotFoundError(f"input folder not found: {base}")
    if (base / "dataset.json").is_file():
        return _msd_images(base / "dataset.json")
    images = sorted(p for p in base.rglob(pattern) if not p.name.endswith(exclude))
    if not images:
        raise FileNotFoundError(f"no {pattern} volumes in {base}")
    return [{"image": str(p), "case": p.name.split(".nii")[0]} for p in images]


def _msd_images(dataset_json: Path) -> list[dict]:
    records = msd_datalist(str(dataset_json), split="all", with_label=False)
    content = json.loads(Path(dataset_json).read_text())
    if "validation" in content:
        seen = {r["image"] for r in records}
        records += [r for r in msd_datalist(str(dataset_json), split="val", with_label=False) if r["image"] not in seen]
    return records


def check_volumes(records: Sequence[dict], key: str = "image") -> list[dict]:
    """Read every input once before any output is written: a truncated or unreadable file, a volume that is not
    3D with one channel, or non-finite intensities stop the run with an error naming the file, instead of after
    the masks of the volumes before it were written."""
    import nibabel as nib

    for rec in check_files(records, (key,)):
        path = rec[key]
        try:
            img = nib.load(path)
            data = np.asanyarray(img.dataobj)
        except Exception as err:
            raise ValueError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err})") from err
        shape = data.shape
        if len(shape) == 4 and shape[-1] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise ValueError(f"{path}: expected a single-channel 3D volume, got an array of shape {data.shape}")
        if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
            raise ValueError(f"{path}: image holds NaN or infinite intensities")
    return list(records)


def _whole_number(value, name: str, minimum: int) -> int:
    """``value`` as an int, or a ValueError naming ``name`` when it is not a whole number >= ``minimum``."""
    try:
        ok = not isinstance(value, bool) and int(value) == value and value >= minimum
    except (TypeError, ValueError, OverflowError):  # text, None, NaN: refused by name below, not by int()
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


class SliceDataset(Dataset):
    """2D samples cut from preprocessed volumes, with stable sample ids.

    Args:
        data: volume records, as produced by the datalist functions.
        volume_transform: applied once per volume; must return channel-first ``image`` and ``label`` arrays
            of shape (1, H, W, S).
        transform: applied to every 2D sample each time it is read (augmentation).
        store: optional pseudo-label store; when given, each sample also gets a ``pseudo`` key read from it
            before ``transform`` runs, so random spatial transforms move it with the image and the label.
        slice_axis: the through-plane axis of the volume, counted without the channel.
        label_noise: optional ``{"alpha", "beta", "seed", "radius_scale"}``: simulate label noise (Sec. 3.2) on the
            slices' labels, keeping the originals, which :meth:`clean_labels` returns for reporting.
        num_classes: classes including background, needed with ``label_noise``.
        oracle: with ``label_noise`` only: replace the noisy labels by a reference set built from the true noise
            flags (``"drop_noisy"``, ``"drop_missing"``, ``"fix_boundary"``, see
            :func:`scripts.noise.oracle_labels`), to measure what a perfect filter or repair would reach.
        track_meta: whether ``transform`` runs with MONAI's meta data tracking (off by default: slices carry their
            identity in plain keys).
        trusted_empty_run: an empty manual slice in a run of at least this many empty slices that reaches the first
            or the last slice of its volume is taken as truly empty (:func:`empty_end_runs`); ``None``: no empty
            slice is. A structure that ends leaves long empty runs at a volume's ends, while a missed annotation
            is a gap of a slice or two. Each sample carries the classes its manual slice states
            (``classes_known``, bits of :func:`scripts.losses.class_bits`): those it draws, or every class on a
            slice taken as truly empty, so that ``HybridLoss(ignore_empty_manual=True)`` keeps its background.
            Those slices are marked in ``trusted`` ((N,) bool), which the label filter does not judge
            (``LabelFilter(skip_trusted=True)``). The run is counted in slices of the volume, so with
            ``slice_step`` it spans ``ceil(trusted_empty_run / slice_step)`` kept slices.
        trusted_empty_margin: the empty slices of such a run nearest the labelled part of the volume (this many
            kept slices) are not taken as truly empty: that is where an annotator who stops too early leaves a
            missed slice, which would otherwise teach background where the structure is and escape the filter.
        slice_step: keep every ``slice_step``-th slice of each volume, from the first (1: all of them). Neighbouring
            slices of a volume are nearly alike, so a short training set spread over more subjects is more varied
            than all the slices of a few; each sample keeps its index in its volume (``slice``).
    """

    def __init__(
        self,
        data: Sequence[dict],
        volume_transform: Callable | None = None,
        transform: Callable | None = None,
        store=None,
        slice_axis: int = -1,
        keys: Sequence[str] = ("image", "label"),
        label_noise: dict | None = None,
        num_classes: int | None = None,
        track_meta: bool = False,
        oracle: str | None = None,
        trusted_empty_run: int | None = None,
        slice_step: int = 1,
        trusted_empty_margin: int = 0,
    ) -> None:
        self.trusted_empty_margin = _whole_number(trusted_empty_margin, "trusted_empty_margin", minimum=0)
        self.slice_step = _whole_number(slice_step, "slice_step", minimum=1)
        self.trusted_empty_run = (None if trusted_empty_run is None
                                  else _whole_number(trusted_empty_run, "trusted_empty_run", minimum=1))
        self.volumes = list(data)
        self.keys = tuple(keys)
        self.volume_transform = volume_transform
        self.store = store
        self.track_meta = track_meta
        samples = []
        self.volume_info: list[dict] = []
        for rec in self.volumes:
            vol = self._load_volume(volume_transform, rec)
            arrays = {k: torch.as_tensor(np.asarray(vol[k])) for k in self.keys}
            kept = range(0, arrays[self.keys[0]].shape[slice_axis], self.slice_step)
            n_slices = len(kept)
            meta = getattr(vol[self.keys[0]], "meta", {})
            # where the slices came from, so per-slice results can be written back into the source volume: the
            # label's invertible operations (zoom, canvas), or the origin of a label-centred crop
            label = vol.get("label")
            ops = copy.deepcopy(list(getattr(label, "applied_operations", []) or []))
            self.volume_info.append({"record": rec, "first_id": len(samples), "n_slices": n_slices,
                                     "crop_origin": meta.get("crop_origin"), "crop_size": meta.get("crop_size"),
                                     "label_ops": ops})
            for z in kept:
                sample = {"id": len(samples), "case": rec.get("case", str(rec["image"])), "slice": z}
                for k in self.keys:
                    sl = arrays[k].select(slice_axis, z).contiguous()
                    # labels are kept compact: a CT set can hold tens of thousands of slices in memory
                    sample[k] = sl.to(torch.uint8) if k == "label" else sl.float()
                samples.append(sample)
        if not samples:
            raise ValueError("the data set holds no slices: every volume was empty.")
        super().__init__(data=samples, transform=transform)
        logger.info(f"SliceDataset: {len(self.volumes)} volumes, {len(samples)} slices")
        if label_noise:
            if num_classes is None:
                raise ValueError("label_noise needs num_classes")
            noisy, flags = simulate_label_noise(self.labels(), num_classes=num_classes, **label_noise)
            self.set_labels(torch.as_tensor(noisy))
            self.noise_flags = torch.as_tensor(flags)
            logger.info(f"SliceDataset: simulated noise {label_noise} on {int((self.noise_flags > 0).sum())} "
                        f"of {len(samples)} slices")
        if oracle is not None:
            if not label_noise:
                raise ValueError(f"oracle '{oracle}' needs label_noise: it is built from the true noise flags")
            labels = oracle_labels(self.labels(), self.clean_labels(), self.noise_flags, oracle)
            self.set_labels(labels)  # the clean labels kept by the noise step stay as they are
            dropped = int((labels == IGNORE_INDEX).flatten(1).all(1).sum())
            logger.info(f"SliceDataset: oracle '{oracle}' labels, {dropped} slices without supervision")
        self._index_label_classes()

    def _index_label_classes(self) -> None:
        """The classes each manual slice states (``classes_known``), once per label set rather than per read: the
        classes it draws, or every class on a slice taken as truly empty (``trusted_empty_run``), logged."""
        labels = self.labels()
        self.classes_known = torch.tensor([class_bits(lab) for lab in labels], dtype=torch.long)
        self.trusted = torch.zeros(len(labels), dtype=torch.bool)
        if self.trusted_empty_run is None:
            return
        min_run = -(-self.trusted_empty_run // self.slice_step)
        truly_empty = empty_end_runs(labels, [v["n_slices"] for v in self.volume_info], min_run,
                                     margin=self.trusted_empty_margin)
        self.classes_known[truly_empty] = ALL_CLASS_BITS
        self.trusted = truly_empty
        empty, taken = int((labels.flatten(1).amax(1) == 0).sum()), int(truly_empty.sum())
        run = f"{self.trusted_empty_run}" + (f" volume slices ({min_run} kept)" if self.slice_step > 1 else "")
        beside = f", less the {self.trusted_empty_margin} next to the labelled slices," \
            if self.trusted_empty_margin else ""
        logger.info(f"SliceDataset: {taken} of {empty} empty manual slices lie in runs of >= {run} "
                    f"at a volume's end{beside} and are taken as truly empty; the other {empty - taken} may be "
                    "missed annotations")

    @staticmethod
    def _load_volume(volume_transform, rec: dict) -> dict:
        """Run the volume preprocessing, naming the volume when it fails (MONAI's chained message names the
        transform first and the file only deep in the cause)."""
        if volume_transform is None:
            return dict(rec)
        try:
            return apply_transform(volume_transform, dict(rec))
        except Exception as err:
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            names = ", ".join(str(rec[k]) for k in ("image", "label") if isinstance(rec.get(k), (str, Path)))
            raise RuntimeError(f"cannot preprocess {names or rec.get('case', 'a volume')}: {cause}") from err

    @property
    def slice_shape(self) -> tuple[int, ...]:
        return tuple(self.data[0][self.keys[0]].shape[1:])

    def labels(self) -> torch.Tensor:
        """All manual labels as one (N, H, W) uint8 tensor, in id order."""
        return torch.stack([s["label"][0] for s in self.data])

    def set_labels(self, labels: torch.Tensor) -> None:
        """Replace the manual labels (used to inject simulated noise), keeping the originals as ``clean_label``."""
        if labels.shape[0] != len(self.data):
            raise ValueError(f"got {labels.shape[0]} labels for {len(self.data)} slices")
        for s, lab in zip(self.data, labels):
            s.setdefault("clean_label", s["label"])
            s["label"] = lab[None].to(torch.uint8)
        if hasattr(self, "classes_known"):
            self._index_label_classes()

    def clean_labels(self) -> torch.Tensor | None:
        """The labels before simulated noise (N, H, W), or ``None`` when no noise was simulated."""
        if "clean_label" not in self.data[0]:
            return None
        return torch.stack([s["clean_label"][0] for s in self.data])

    def _pseudo_known(self, index: int, manual: torch.Tensor, pseudo: torch.Tensor) -> int:
        """The classes Y' states for ``HybridLoss(cleansed_absent_unknown=True)``, as :func:`class_bits`: every
        class where Y' is the manual label; on a cleansed slice, those it holds, plus every class when the manual
        slice is taken as truly empty."""
        if self.classes_known[index] == ALL_CLASS_BITS or torch.equal(pseudo, manual.to(pseudo.dtype)):
            return ALL_CLASS_BITS
        return class_bits(pseudo)

    def _transform(self, index: int):
        sample = dict(self.data[index])
        sample.pop("clean_label", None)
        if self.store is not None:
            sample["pseudo"] = self.store.get(sample["id"])[None]
            # the classes the whole manual slice states: after cropping, a background patch of a labelled slice
            # cannot be told from a patch of a missed one (HybridPrepareBatch(slice_flags=True))
            sample["classes_known"] = int(self.classes_known[sample["id"]])
            sample["pseudo_known"] = self._pseudo_known(sample["id"], sample["label"], sample["pseudo"])
        for k in ("label", "pseudo"):
            if k in sample:
                sample[k] = sample[k].float()
        if self.transform is None:
            return sample
        # training slices need no meta data (their ids travel as plain keys); without it the augmentation and
        # the collation run about four times faster
        previous = get_track_meta()
        set_track_meta(self.track_meta)
        try:
            with warnings.catch_warnings():
                # a slice without foreground (truly empty, or a missed label) is expected here: the patch sampler
                # then draws a background patch, which is what it should do, without a warning per slice
                warnings.filterwarnings("ignore", message="Num foregrounds 0")
                return apply_transform(self.transform, sample)
        finally:
            set_track_meta(previous)


def empty_end_runs(labels: torch.Tensor, volume_sizes: Sequence[int], min_run: int, margin: int = 0) -> torch.Tensor:
    """(N,) bool: the empty label maps that lie in a run of at least ``min_run`` consecutive empty maps reaching
    the first or the last slice of their volume, less the ``margin`` maps of each run nearest the labelled part.

    Args:
        labels: (N, H, W) label maps, volume after volume, slices in order within a volume.
        volume_sizes: slices per volume, summing to N.
        min_run: the shortest run that counts (its length before the margin is taken off).
        margin: maps of each run, next to the volume's labelled slices, that are not returned. A volume with no
            labelled slice has no such side and is returned whole.
    """
    if sum(volume_sizes) != labels.shape[0]:
        raise ValueError(f"volume sizes sum to {sum(volume_sizes)}, but there are {labels.shape[0]} label maps")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    empty = ((labels > 0) & (labels != IGNORE_INDEX)).flatten(1).any(1).logical_not()
    out = torch.zeros_like(empty)
    start = 0
    for size in volume_sizes:
        vol = empty[start : start + size]
        for forward in (True, False):  # the run from the first slice, then the one from the last
            run = (vol if forward else vol.flip(0)).long().cumprod(0).bool()
            length = int(run.sum())
            if length >= min_run:
                if length < size:
                    run[max(length - margin, 0) : length] = False
                out[start : start + size] |= run if forward else run.flip(0)
        start += size
    return out


def noise_for_phantoms(records: Sequence[dict], noise: dict | None) -> dict | None:
    """``noise`` when every training image belongs to a generated phantom data set, else ``None``.

    The default configuration simulates label noise on the embedded phantoms so that the main job has something
    to cleanse; anyone else's labels (another ``--dataset_dir``, a datalist handed in by MONAI Label) must reach
    training unchanged unless noise is asked for explicitly (``configs/noise.json`` sets ``label_noise`` itself).
    A phantom data set is recognised by the ``phantom.json`` its generator writes at its root.
    """
    phantom = bool(records) and all(
        (Path(r["image"]).parent.parent / METADATA_FILE).is_file() for r in records)
    if noise and phantom:
        logger.info(f"simulating label noise {noise} on the phantom training labels")
        return noise
    return None


def output_path(image: str, output_dir: str, postfix: str) -> Path:
    """Where inference writes the mask of ``image`` (SaveImaged's naming with ``separate_folder=False``)."""
    name = Path(image).name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
    return Path(output_dir) / f"{stem}_{postfix}.nii.gz"


def refuse_existing_outputs(records: Sequence[dict], output_dir: str, postfix: str = "seg",
                            overwrite: bool = False) -> list[dict]:
    """Stop before any work when an output would replace an input, another output of this run or, unless
    ``overwrite``, an earlier result."""
    overwrite = as_flag(overwrite, "overwrite")
    inputs = {Path(r["image"]).resolve() for r in records}
    clashes = []
    planned: dict[Path, str] = {}
    for rec in records:
        out = output_path(rec["image"], output_dir, postfix).resolve()
        if out in inputs:
            raise FileExistsError(f"output {out} would overwrite an input volume: choose another output_dir")
        # outputs are named by file name only, so same-named inputs in different folders would overwrite each other
        if out in planned:
            raise FileExistsError(f"{planned[out]} and {rec['image']} would both be written to {out}: give the "
                                  f"volumes distinct file names or run them separately")
        planned[out] = rec["image"]
        if out.exists() and not overwrite:
            clashes.append(str(out))
    if clashes:
        raise FileExistsError(
            f"{len(clashes)} output file(s) already exist, e.g. {clashes[0]}; pass --overwrite True to replace "
            f"them or choose another --output_dir"
        )
    return list(records)
