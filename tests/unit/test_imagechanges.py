"""`logwrites.imagechanges`: what was written to an image since a generation."""

from __future__ import annotations

from logwrites.imagechanges import ImageChanges, Written


def test_since_lists_only_later_writes_merged() -> None:
    changes = ImageChanges()
    changes.wrote(0, 512)
    seen = changes.generation
    assert changes.since(seen) is not None and not changes.since(seen)
    changes.wrote(4096, 512)
    changes.wrote(4608, 512)   # adjoins the one before: one span
    changes.wrote(100, 10)
    written = changes.since(seen)
    assert written is not None and written
    assert list(written.within(0, 1 << 20)) == [(100, 10), (4096, 1024)]
    assert list(written.within(4200, 100)) == [(4200, 100)]
    assert list(written.within(0, 100)) == []
    assert list(changes.since(0).within(0, 1000)) == [(0, 512)]  # type: ignore[union-attr]


def test_forgotten_or_too_old_is_unknown() -> None:
    changes = ImageChanges(keep=3)
    for k in range(3):
        changes.wrote(k * 4096, 4096)
    assert changes.since(0) is not None
    changes.wrote(99 * 4096, 4096)  # the first write is no longer remembered
    assert changes.since(0) is None
    assert list(changes.since(1).within(0, 1 << 30)) == [  # type: ignore[union-attr]
        (4096, 8192), (99 * 4096, 4096)]
    now = changes.generation
    changes.forget()
    assert changes.since(now) is None
    assert changes.since(changes.generation) is not None


def test_within_finds_spans_on_both_sides_of_a_range() -> None:
    written = Written([(0, 10), (20, 30), (40, 100), (200, 210)])
    assert list(written.within(25, 30)) == [(25, 5), (40, 15)]
    assert list(written.within(5, 300)) == [(5, 5), (20, 10), (40, 60), (200, 10)]
    assert not Written([])


def test_kept_compares_only_the_written_parts() -> None:
    image = bytearray(b"a" * 100)
    pieces = [(0, bytes(image[0:40])), (60, bytes(image[60:100]))]

    def read(at: int, n: int) -> bytes:
        return bytes(image[at:at + n])

    image[50] = ord("x")  # outside every piece
    image[70] = ord("y")  # inside one, but not where the set says it was written
    assert Written([(45, 55), (10, 20)]).kept(pieces, read)
    assert not Written([(65, 75)]).kept(pieces, read)
    image[70] = ord("a")
    assert Written([(65, 75)]).kept(pieces, read)
