"""Reader and writer of the adjacency-list split files (``train.txt`` / ``valid.txt`` / ``test.txt``).

One line per user: ``user item item ...`` (0-based decimal ids, separated by spaces or tabs). A user
line with no items is allowed (the user exists but has no interaction in that split); a user may
appear on several lines (their items are concatenated); blank lines carry nothing and are skipped.

Design choices:
- Parsing is vectorised over raw bytes with numpy, block by block (``BLOCK_BYTES``, cut at a
  newline): one lookup table rejects any byte that is not a digit or whitespace, token boundaries come
  from ``np.diff`` of the digit mask and values from a Horner loop over digit positions (one pass per
  digit, not per token). No per-token Python work, so a 200M-interaction file streams at disk speed.
- Errors stay line-accurate: when a block holds a bad byte, only that line is re-examined in Python
  to say exactly what is wrong (negative id, float, non-integer token, non-UTF-8 bytes).
- Ids of more than 18 digits take a slow exact path (there are few); beyond int64 they are an error.
- The writer formats integers with numpy too (digit by digit into one byte buffer).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from goat_dist.data.dataset import Interactions
from goat_dist.data.errors import DataError
from goat_dist.data.fsio import basename, fs_and_path, open_url

BLOCK_BYTES = 16 << 20
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
_MAX_FAST_DIGITS = 18  # 10**18 - 1 < 2**63: Horner in int64 cannot overflow

_DIGIT = np.zeros(256, dtype=bool)
_DIGIT[48:58] = True
_ALLOWED = _DIGIT.copy()
_ALLOWED[[9, 10, 13, 32]] = True  # tab, newline, carriage return, space
_DIGIT.setflags(write=False)
_ALLOWED.setflags(write=False)


@dataclass(slots=True)
class AdjacencyFile:
    """What one split file held.

    ``interactions`` [E] pairs in file order; ``lines`` = number of lines; ``max_user`` = the largest
    user id on any line, including lines without items (-1 for an empty file); ``users_without_items``
    = lines that name a user but no item."""

    interactions: Interactions
    file: str
    lines: int
    max_user: int
    users_without_items: int


def smallest_int_dtype(max_value: int) -> np.dtype:
    """int32 when ``max_value`` fits, else int64."""
    return np.dtype(np.int32) if max_value <= INT32_MAX else np.dtype(np.int64)


# --------------------------------------------------------------------------------------------------
# Reading

def iter_blocks(f, block_bytes: int = BLOCK_BYTES):
    """Yield (first_line_number, bytes) blocks of whole lines from a binary file object.

    Every block ends with ``\\n`` (one is appended to a last line without it)."""
    rest = b""
    line_no = 1
    while True:
        data = f.read(block_bytes)
        if not data:
            if rest:
                yield line_no, rest + b"\n"
            return
        if rest:
            data = rest + data
        cut = data.rfind(b"\n")
        if cut < 0:
            rest = data
            continue
        block = data[: cut + 1]
        rest = data[cut + 1:]
        yield line_no, block
        line_no += block.count(b"\n")


def _token_at(line: bytes, col: int) -> tuple[bytes, int]:
    """The whitespace-delimited token of ``line`` that covers byte ``col``, and its field number."""
    start = col
    while start > 0 and line[start - 1:start] not in (b" ", b"\t", b"\r"):
        start -= 1
    end = col
    while end < len(line) and line[end:end + 1] not in (b" ", b"\t", b"\r"):
        end += 1
    field = len(line[:start].split()) + 1
    return line[start:end], field


_FLOAT_RE = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)


def describe_bad_token(token: bytes, field: int, what: str = "id") -> str:
    """Why ``token`` is not a non-negative decimal integer (message without the location)."""
    try:
        text = token.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (f"undecodable bytes (not UTF-8) in field {field}: {token[exc.start:exc.start + 4]!r}")
    if re.fullmatch(r"-\d+", text):
        return f"negative {what} {text} in field {field}"
    if re.fullmatch(r"\+\d+", text):
        return f"signed token {text!r} in field {field}; {what}s are unsigned decimal integers"
    if _FLOAT_RE.fullmatch(text):
        return f"float token {text!r} in field {field} where an integer {what} is expected"
    if text == "":
        return f"empty field {field} where an integer {what} is expected"
    return f"non-integer token {text!r} in field {field} where an integer {what} is expected"


def _bad_byte_error(name: str, block: bytes, first_line: int, pos: int) -> DataError:
    line_start = block.rfind(b"\n", 0, pos) + 1
    line_end = block.find(b"\n", pos)
    line = block[line_start:line_end if line_end >= 0 else len(block)]
    line_no = first_line + block.count(b"\n", 0, pos)
    byte = block[pos]
    if byte < 32 or byte == 127:
        return DataError(name, f"control character 0x{byte:02x} at column {pos - line_start + 1}",
                         line=line_no)
    token, field = _token_at(line, pos - line_start)
    return DataError(name, describe_bad_token(token, field), line=line_no)


def _groups_by_length(lengths: np.ndarray):
    """Yield (L, token indices) for every distinct length L (a stable counting sort)."""
    order = np.argsort(lengths.astype(np.int8), kind="stable")
    sorted_len = lengths[order]
    bounds = np.searchsorted(sorted_len, np.arange(int(sorted_len[-1]) + 2))
    for length in range(int(sorted_len[0]), int(sorted_len[-1]) + 1):
        lo, hi = bounds[length], bounds[length + 1]
        if hi > lo:
            yield length, order[lo:hi]


def digits_to_int(a: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Decimal values of the digit runs ``a[starts[k] : starts[k] + lengths[k]]``.

    Tokens are grouped by length, then Horner's rule runs unmasked over each group (one vectorised
    pass per digit position), so the work is one gather per digit. **Shapes:** ``a`` [B] uint8 bytes,
    ``starts``/``lengths`` [T] -> [T] int64. ``lengths`` must be in 1..18 (no int64 overflow)."""
    out = np.empty(starts.shape[0], dtype=np.int64)
    if starts.shape[0] == 0:
        return out
    for length, idx in _groups_by_length(lengths):
        s = starts[idx]
        acc = a[s].astype(np.int64)
        acc -= 48
        for j in range(1, length):
            acc *= 10
            acc += a[s + j]
            acc -= 48
        out[idx] = acc
    return out


@dataclass(slots=True)
class _Block:
    users: np.ndarray  # [E_b] int64, user of each item token
    items: np.ndarray  # [E_b] int64
    item_lines: np.ndarray | None  # [E_b] 1-based line numbers (only when asked for)
    n_lines: int
    max_user: int
    users_without_items: int


def parse_block(name: str, block: bytes, first_line: int, *, with_lines: bool = False) -> _Block:
    """Parse whole lines of an adjacency-list file; raise DataError naming the first bad line."""
    a = np.frombuffer(block, dtype=np.uint8)
    bad = ~_ALLOWED[a]
    if bad.any():
        raise _bad_byte_error(name, block, first_line, int(np.argmax(bad)))
    newlines = np.flatnonzero(a == 10)
    edges = np.diff(_DIGIT[a].view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    lengths = np.flatnonzero(edges == -1) - starts
    del edges
    if starts.shape[0] == 0:
        return _Block(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64) if with_lines else None,
                      len(newlines), -1, 0)
    long_tokens = np.flatnonzero(lengths > _MAX_FAST_DIGITS)
    values = digits_to_int(a, starts, np.minimum(lengths, _MAX_FAST_DIGITS))
    token_line = np.cumsum(a == 10, dtype=np.int32)[starts]  # 0-based line index inside the block
    for k in long_tokens:  # rare: exact Python ints, error beyond int64
        s, n = int(starts[k]), int(lengths[k])
        value = int(block[s:s + n])
        if value > INT64_MAX:
            raise DataError(name, f"id {value} overflows int64", line=first_line + int(token_line[k]))
        values[k] = value
    first = np.empty(starts.shape[0], dtype=bool)
    first[0] = True
    np.not_equal(token_line[1:], token_line[:-1], out=first[1:])
    group = np.cumsum(first) - 1
    user_values = values[first]
    is_item = ~first
    items = values[is_item]
    users = user_values[group[is_item]]
    per_line = np.bincount(group, minlength=user_values.shape[0])  # tokens per non-blank line
    lines = (first_line + token_line[is_item]) if with_lines else None
    return _Block(users, items, lines, len(newlines), int(user_values.max()), int((per_line == 1).sum()))


class _PairBuffer:
    """Appends (user, item) blocks into one pair of int32 arrays (int64 once an id needs it).

    The capacity is estimated from the file size and the first block's bytes per pair (+10%), so a
    200M-pair file is read without the 2x peak of concatenating blocks at the end; the result is a
    view, and the unused tail of the buffer is never written, so it is never paged in."""

    def __init__(self, total_bytes: int | None):
        self.total_bytes = total_bytes
        self.n = 0
        self.users = np.empty(0, dtype=np.int32)
        self.items = np.empty(0, dtype=np.int32)

    def _reserve(self, need: int, dtype: np.dtype, block_bytes: int) -> None:
        cap = self.users.shape[0]
        if need <= cap and dtype == self.users.dtype:
            return
        if need > cap:
            estimate = 0
            if self.total_bytes and block_bytes:
                estimate = int(self.total_bytes / block_bytes * need * 1.1) + 1024
            cap = max(need, estimate, int(cap * 1.5))
        for attr in ("users", "items"):
            new = np.empty(cap, dtype=dtype)
            new[: self.n] = getattr(self, attr)[: self.n]
            setattr(self, attr, new)

    def append(self, users: np.ndarray, items: np.ndarray, max_id: int, block_bytes: int) -> None:
        dtype = np.promote_types(self.users.dtype, smallest_int_dtype(max_id))
        self._reserve(self.n + users.shape[0], dtype, block_bytes if self.n == 0 else 0)
        self.users[self.n: self.n + users.shape[0]] = users
        self.items[self.n: self.n + items.shape[0]] = items
        self.n += users.shape[0]

    def result(self, dtype: np.dtype) -> Interactions:
        return Interactions(self.users[: self.n].astype(dtype, copy=False), self.items[: self.n].astype(dtype, copy=False))


def read_adjacency(url: str, *, block_bytes: int = BLOCK_BYTES, name: str | None = None) -> AdjacencyFile:
    """Read one adjacency-list split file (any fsspec URL).

    Returns the (user, item) pairs in file order as int32 arrays when every id fits, else int64.
    Raises DataError ``FILE:LINE: ...`` on the first defect (``name`` overrides FILE in messages)."""
    name = name or basename(url)
    try:
        fs, path = fs_and_path(url)
        total_bytes = int(fs.size(path))
    except (OSError, TypeError, ValueError):
        total_bytes = None
    pairs = _PairBuffer(total_bytes)
    max_id = -1
    n_lines = 0
    max_user = -1
    empty_users = 0
    with open_url(url, "rb") as f:
        for first_line, block in iter_blocks(f, block_bytes):
            b = parse_block(name, block, first_line)
            n_lines += b.n_lines
            max_user = max(max_user, b.max_user)
            empty_users += b.users_without_items
            if b.items.shape[0]:
                block_max = max(int(b.items.max()), int(b.users.max()))
                max_id = max(max_id, block_max)
                pairs.append(b.users, b.items, block_max, len(block))
    inter = pairs.result(smallest_int_dtype(max(max_id, max_user, 0)))
    return AdjacencyFile(inter, name, n_lines, max_user, empty_users)


def find_line(url: str, *, user_limit: int | None = None, item_limit: int | None = None,
              block_bytes: int = BLOCK_BYTES) -> tuple[int, str, int] | None:
    """First (line, "user"|"item", id) of ``url`` with a user id >= ``user_limit`` or an item id >=
    ``item_limit`` (None = no limit), or None. Used to name the line of an id that has no feature row.
    Lines without items are checked for their user id too."""
    name = basename(url)
    with open_url(url, "rb") as f:
        for first_line, block in iter_blocks(f, block_bytes):
            b = parse_block(name, block, first_line, with_lines=True)
            hits = []
            if item_limit is not None and b.items.shape[0]:
                bad = np.flatnonzero(b.items >= item_limit)
                if bad.shape[0]:
                    hits.append((int(b.item_lines[bad[0]]), "item", int(b.items[bad[0]])))
            if user_limit is not None and b.max_user >= user_limit:
                for off, line in enumerate(block.split(b"\n")):  # rare error path: exact per line
                    toks = line.split()
                    if toks and int(toks[0]) >= user_limit:
                        hits.append((first_line + off, "user", int(toks[0])))
                        break
            if hits:
                return min(hits)
    return None


# --------------------------------------------------------------------------------------------------
# Writing

_POW10 = 10 ** np.arange(19, dtype=np.int64)
_POW10.setflags(write=False)


def format_tokens(tokens: np.ndarray, separators: np.ndarray) -> bytes:
    """Decimal text of non-negative ints, each followed by its separator byte.

    **Shapes:** ``tokens`` [T] ints >= 0, ``separators`` [T] uint8 (e.g. ``ord(' ')``/``ord('\\n')``)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.shape[0] == 0:
        return b""
    if tokens.min() < 0:
        raise ValueError("format_tokens: negative values cannot be written as ids")
    n_digits = np.searchsorted(_POW10, tokens, side="right").astype(np.int8)
    np.maximum(n_digits, 1, out=n_digits)
    ends = np.cumsum(n_digits + 1, dtype=np.int64)
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    out[ends - 1] = separators
    for length, idx in _groups_by_length(n_digits):
        rest = tokens[idx]
        pos = ends[idx] - 2
        for _ in range(length):
            out[pos] = (rest % 10).astype(np.uint8) + 48
            rest //= 10
            pos -= 1
    return out.tobytes()


def format_adjacency(users: np.ndarray, items: np.ndarray) -> bytes:
    """Adjacency-list text for pairs grouped by user: one line per run of equal consecutive users.

    **Shapes:** ``users`` [E], ``items`` [E]. Pairs are written in the given order."""
    users = np.asarray(users)
    items = np.asarray(items)
    n = users.shape[0]
    if n == 0:
        return b""
    run_start = np.flatnonzero(np.concatenate(([True], users[1:] != users[:-1])))
    n_lines = run_start.shape[0]
    user_slot = run_start + np.arange(n_lines)  # token index of each line's user
    tokens = np.empty(n + n_lines, dtype=np.int64)
    is_user = np.zeros(n + n_lines, dtype=bool)
    is_user[user_slot] = True
    tokens[user_slot] = users[run_start]
    tokens[~is_user] = items
    seps = np.full(n + n_lines, ord(" "), dtype=np.uint8)
    seps[user_slot[1:] - 1] = ord("\n")
    seps[-1] = ord("\n")
    return format_tokens(tokens, seps)


def write_adjacency(url: str, users: np.ndarray, items: np.ndarray, *, sort: bool = True) -> None:
    """Write pairs as an adjacency-list file (any fsspec URL); ``sort`` groups them by user first
    (stable, so each user's items keep their order)."""
    users = np.asarray(users)
    items = np.asarray(items)
    if sort and users.shape[0]:
        order = np.argsort(users, kind="stable")
        users, items = users[order], items[order]
    with open_url(url, "wb") as f:
        step = 8_000_000
        i = 0
        while i < users.shape[0]:
            j = min(users.shape[0], i + step)
            while j < users.shape[0] and users[j] == users[j - 1]:  # never split a line
                j += 1
            f.write(format_adjacency(users[i:j], items[i:j]))
            i = j
