"""Tiny stand-ins for the real data sets the GPU-sized configs read, in the on-disk layouts of
the real ones (the files torchvision, torchaudio and the data modules open), with random
content: CIFAR-10's python pickles, an image-folder tree, text files, a TSV of sentence
pairs, Google Speech Commands v2 (16 kHz WAV, split lists) and LibriSpeech (FLAC with
.trans.txt transcripts). Each writer returns the path the config's data option takes.
"""

from __future__ import annotations

import os
import pickle
import wave

import numpy as np

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SPEECH_COMMANDS_WORDS = [
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four", "go", "happy",
    "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one", "right", "seven", "sheila", "six", "stop",
    "three", "tree", "two", "up", "visual", "wow", "yes", "zero"]
_WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about rivers mountains and "
          "old stone bridges near the quiet harbour town").split()


def _sentence(rng, low: int, high: int) -> str:
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), int(rng.integers(low, high))))


def cifar10(root, images_per_file: int = 20, seed: int = 0) -> str:
    """root/cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta as the real pickles.
    Their MD5s are not CIFAR-10's: torchvision's check must be bypassed to read them."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "labels": rng.integers(0, 10, images_per_file).tolist(),
                 "data": rng.integers(0, 256, (images_per_file, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(images_per_file)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": images_per_file, "num_vis": 3072}, f)
    return str(root)


def image_folders(root, classes=("cat", "dog", "fox"), per_class: int = 2, seed: int = 0) -> str:
    """root/{train,val}/<class>/<i>.png, RGB images of odd sizes (the transforms resize them)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for name in classes:
            os.makedirs(os.path.join(root, split, name))
            for i in range(per_class):
                pixels = rng.integers(0, 256, (37 + i, 45, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))
    return str(root)


def text_files(root, documents: int = 6, words: int = 400, seed: int = 0) -> str:
    """root/doc<i>.txt (every other one in a subfolder) of random sentences."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "more"))
    for i in range(documents):
        lines = [_sentence(rng, 5, 15) + "." for _ in range(words // 10)]
        with open(os.path.join(root, "more" if i % 2 else "", f"doc{i}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return str(root)


def parallel_text(root, pairs: int = 60, seed: int = 0) -> tuple[str, str]:
    """root/train.tsv and root/valid.tsv: a source sentence, a tab, its reversed upper-case copy."""
    rng = np.random.default_rng(seed)
    os.makedirs(root)
    paths = []
    for name, n in (("train.tsv", pairs), ("valid.tsv", max(pairs // 5, 4))):
        lines = []
        for _ in range(n):
            source = _sentence(rng, 3, 9)
            lines.append(f"{source}\t{' '.join(reversed(source.split())).upper()}")
        paths.append(os.path.join(root, name))
        with open(paths[-1], "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return paths[0], paths[1]


def _write_wav(path: str, samples: np.ndarray, rate: int = 16000) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def speech_commands(root, words=SPEECH_COMMANDS_WORDS, seed: int = 0) -> str:
    """root/SpeechCommands/speech_commands_v0.02/<word>/<speaker>_nohash_0.wav: three speakers per
    word (train, validation_list.txt, testing_list.txt), clips of 0.5 s (the real ones are at most
    1 s), and a _background_noise_ folder the classes must not include."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "SpeechCommands", "speech_commands_v0.02")
    lists = {"validation_list.txt": [], "testing_list.txt": []}
    for w, word in enumerate(words):
        os.makedirs(os.path.join(folder, word))
        for s, listing in enumerate((None, "validation_list.txt", "testing_list.txt")):
            name = f"{word}/{w:04x}{s:04x}_nohash_0.wav"
            _write_wav(os.path.join(folder, name), 0.1 * rng.standard_normal(8000))
            if listing:
                lists[listing].append(name)
    os.makedirs(os.path.join(folder, "_background_noise_"))
    _write_wav(os.path.join(folder, "_background_noise_", "white_noise.wav"), 0.1 * rng.standard_normal(32000))
    for listing, names in lists.items():
        with open(os.path.join(folder, listing), "w") as f:
            f.write("\n".join(names) + "\n")
    return str(root)


def librispeech(root, subsets=("train-clean-100", "dev-clean", "test-clean"), seed: int = 0) -> str:
    """root/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<i>.flac (1 s, 16 kHz) and
    <speaker>-<chapter>.trans.txt with upper-case transcripts (apostrophes included)."""
    import soundfile

    rng = np.random.default_rng(seed)
    for n, subset in enumerate(subsets):
        speaker, chapter = 100 + n, 1000 + n
        folder = os.path.join(root, "LibriSpeech", subset, str(speaker), str(chapter))
        os.makedirs(folder)
        lines = []
        for i in range(3):
            utterance = f"{speaker}-{chapter}-{i:04d}"
            soundfile.write(os.path.join(folder, utterance + ".flac"), 0.1 * rng.standard_normal(16000), 16000,
                            format="FLAC", subtype="PCM_16")
            lines.append(f"{utterance} {_sentence(rng, 3, 7).upper()} DON'T")
        with open(os.path.join(folder, f"{speaker}-{chapter}.trans.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return str(root)
