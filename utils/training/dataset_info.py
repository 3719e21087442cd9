"""What a run trains on, in numbers: images, their repeats per epoch, the regularisation images mixed in
(--reg_data_dir) and the caption tags; kept in the run's state for experiment_config.json, the LoRA
file's metadata and the dataset line of the log."""

from __future__ import annotations

from utils.data.records import folder_counts


def dataset_info(items: list, num_reg_listed: int = 0) -> dict:
    """The numbers of the run's items (training and regularisation); ``num_reg_listed``: the usable
    regularisation images before kohya's balancing chose the ones used."""
    train = [item.example for item in items if not item.example.is_reg]
    reg = [item.example for item in items if item.example.is_reg]
    folders = folder_counts(train)  # kohya repeats per folder
    reg_per_epoch = sum(example.repeats for example in reg)
    return {"num_train_images": len(train),
            "images_per_epoch": sum(folder.images_per_epoch for folder in folders) + reg_per_epoch,
            "folders": [folder.as_dict() for folder in folders],
            "tag_frequency": tag_frequency([example.caption for example in train]),
            "regularisation": {"num_reg_images": num_reg_listed, "num_reg_images_used": len(reg),
                               "reg_images_per_epoch": reg_per_epoch}}


def dataset_line(info: dict, num_held_out: int, max_train_steps: int, prior_loss_weight: float) -> str:
    """The run's one log line about its data and steps (the batch layout is added by the caller)."""
    reg = info["regularisation"]
    mixed = ""
    if reg["num_reg_images"]:
        mixed = (f" ({reg['reg_images_per_epoch']} of them regularisation images: {reg['num_reg_images_used']} of "
                 f"{reg['num_reg_images']} used, prior loss weight {prior_loss_weight:g})")
    return (f"{info['num_train_images']} training images ({num_held_out} held out), {info['images_per_epoch']} seen "
            f"per epoch{mixed}, {max_train_steps} optimizer steps")


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How often each comma-separated tag appears in the captions (kohya's ss_tag_frequency)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in {t.strip() for t in caption.split(",") if t.strip()}:
            counts[tag] = counts.get(tag, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
