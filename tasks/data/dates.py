"""Date normalization: human-readable English dates in many formats -> ISO 8601 (a seq2seq task).

    "3 March 2021", "Mar 3, 2021", "03/03/21", "wednesday, march 3rd 2021" -> "2021-03-03"

Examples are generated on the fly (deterministically per index) from a seeded RNG over a
date range. The split is by date: a date belongs to train, val or test by a CRC-32 hash
of its ISO string (stable across runs and machines), so validation and test dates never
appear in training, in any format, and exact match measures generalization to new dates.
Rendering is locale-free: month and weekday names come from the English tables below,
not from strftime (whose names follow the process locale).
"""

from __future__ import annotations

import datetime as dt
import random
import string
import zlib
from typing import Optional, Sequence

from torch.utils.data import Dataset

from .parallel import PairsDataModule
from .tokenizers import CharTokenizer

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# strftime-like patterns. Directives: %Y year, %y two-digit year, %m / %d zero-padded month
# and day, %-m / %-d unpadded, %o ordinal day ("3rd"), %B / %b month name / 3-letter
# abbreviation, %A / %a weekday / 3-letter abbreviation. Slashes are month-first (US) and
# dots day-first, so no pattern reads two ways.
FORMATS = (
    "%Y-%m-%d",
    "%Y-%-m-%-d",
    "%Y/%m/%d",
    "%Y%m%d",
    "%m/%d/%y",
    "%-m/%-d/%Y",
    "%d.%m.%Y",
    "%-d.%-m.%y",
    "%-d %B %Y",
    "%d %b %y",
    "%-d %b %Y",
    "%d%b%Y",
    "%B %-d, %Y",
    "%b %-d, %Y",
    "%b. %-d, %Y",
    "%B %o, %Y",
    "%o of %B, %Y",
    "%o %B %Y",
    "%A, %B %o %Y",
    "%A %-d %B %Y",
    "%a %b %-d %Y",
    "%a, %d %b %Y",
)

CASES = ("as is", "lower", "upper", "capitalized")

# Every character any format and case can produce; one fixed alphabet for source and target.
DATE_ALPHABET = string.digits + string.ascii_letters + " ,./-"


def ordinal(day: int) -> str:
    """3 -> "3rd", 11 -> "11th", 22 -> "22nd"."""
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def render_date(date: dt.date, pattern: str, case: str = "as is") -> str:
    """`date` written with one of the FORMATS patterns (see the directives there), then cased.

    Raises ValueError for an unknown directive or case.
    """
    values = {"Y": f"{date.year:04d}", "y": f"{date.year % 100:02d}", "m": f"{date.month:02d}",
              "d": f"{date.day:02d}", "-m": str(date.month), "-d": str(date.day), "o": ordinal(date.day),
              "B": MONTHS[date.month - 1], "b": MONTHS[date.month - 1][:3], "A": WEEKDAYS[date.weekday()],
              "a": WEEKDAYS[date.weekday()][:3]}
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] != "%":
            out.append(pattern[i])
            i += 1
            continue
        key = pattern[i + 1:i + 3] if pattern[i + 1:i + 2] == "-" else pattern[i + 1:i + 2]
        if key not in values:
            raise ValueError(f"unknown directive %{key} in date pattern {pattern!r}")
        out.append(values[key])
        i += 1 + len(key)
    text = "".join(out)
    if case == "as is":
        return text
    if case == "lower":
        return text.lower()
    if case == "upper":
        return text.upper()
    if case == "capitalized":
        return text[:1].upper() + text[1:].lower()
    raise ValueError(f"case must be one of {', '.join(CASES)}, got {case!r}")


def date_split(date: dt.date, split: Sequence[int] = (80, 10, 10)) -> str:
    """"train", "val" or "test": CRC-32 of the ISO date mod sum(split), cut by the split's shares."""
    bucket = zlib.crc32(date.isoformat().encode()) % sum(split)
    if bucket < split[0]:
        return "train"
    return "val" if bucket < split[0] + split[1] else "test"


class DatesDataset(Dataset):
    """`size` (source, target) pairs over `dates`; example i is the same on every call (seed, i).

    Each example draws a date, a pattern of FORMATS and a case; the target is date.isoformat().
    """

    def __init__(self, dates: Sequence[dt.date], size: int, seed: int):
        if not dates:
            raise ValueError("DatesDataset needs at least one date")
        self.dates, self.size, self.seed = list(dates), size, seed

    def __len__(self) -> int:
        return self.size

    def example(self, i: int) -> tuple[dt.date, str, str]:
        """(date, pattern, case) of example i."""
        if not 0 <= i < self.size:
            raise IndexError(f"example {i} out of range [0, {self.size})")
        rng = random.Random(self.seed * 1_000_003 + i)
        return rng.choice(self.dates), rng.choice(FORMATS), rng.choice(CASES)

    def __getitem__(self, i: int) -> tuple[str, str]:
        date, pattern, case = self.example(i)
        return render_date(date, pattern, case), date.isoformat()


class DatesDataModule(PairsDataModule):
    """Date normalization pairs generated on the fly; split by date (see the module docstring).

    Args:
        train_size, val_size, test_size: examples per split (per epoch: the same each epoch).
        start, end: the ISO date range, inclusive. At most 100 years, so that a two-digit
            year names one date; the default is the window of C's and Python's strptime %y
            (69-99 -> 19xx, 00-68 -> 20xx).
        split: shares of the dates (by hash) in train, val and test.
        seed: examples depend on it (and the split on the dates only).
        batch_size, num_workers: of the loaders.

    The tokenizer is a CharTokenizer over DATE_ALPHABET (vocab_size 72), for both sides.
    """

    def __init__(self, train_size: int = 50000, val_size: int = 2000, test_size: int = 2000,
                 start: str = "1969-01-01", end: str = "2068-12-31", split: tuple[int, int, int] = (80, 10, 10),
                 seed: int = 0, batch_size: int = 128, num_workers: int = 0):
        super().__init__(batch_size, num_workers, max_length=64)
        self.start, self.end = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
        if self.end < self.start:
            raise ValueError(f"end ({end}) is before start ({start})")
        if self.end.year - self.start.year >= 100:
            raise ValueError(f"the date range {start}..{end} spans more than 100 years: two-digit years would be "
                             f"ambiguous")
        if len(split) != 3 or min(split) <= 0:
            raise ValueError(f"split must be three positive shares (train, val, test), got {split}")
        for name, size in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if size < 1:
                raise ValueError(f"{name} must be positive, got {size}")
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.split, self.seed = tuple(split), seed
        self.tokenizer = CharTokenizer(DATE_ALPHABET)

    def split_dates(self) -> dict[str, list[dt.date]]:
        """The dates of the range in each split: {"train": [...], "val": [...], "test": [...]}."""
        out: dict[str, list[dt.date]] = {"train": [], "val": [], "test": []}
        for n in range((self.end - self.start).days + 1):
            date = self.start + dt.timedelta(days=n)
            out[date_split(date, self.split)].append(date)
        return out

    def setup(self, stage: Optional[str] = None):
        if self.train_set is not None:
            return
        dates = self.split_dates()
        for name in dates:
            if not dates[name]:
                raise ValueError(f"the date range {self.start}..{self.end} leaves no {name} dates; widen it")
        # Distinct seeds per split, so no two splits share an example stream.
        self.train_set, self.val_set, self.test_set = (
            DatesDataset(dates[name], self.sizes[name], seed=self.seed * 3 + k)
            for k, name in enumerate(("train", "val", "test")))
