import os
import threading

from mt.translate import read_chunks


def _next_within(iterator, seconds=10):
    result = []
    thread = threading.Thread(target=lambda: result.append(next(iterator)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "read_chunks waited for more input instead of returning what had arrived"
    return result[0]


def test_chunks_end_when_no_more_input_is_waiting():
    read, write = os.pipe()
    chunks = read_chunks(read)
    os.write(write, b"one\ntwo\n")
    assert _next_within(chunks) == ["one", "two"]  # the writer is still open: no EOF yet
    os.write(write, b"thr\xffee\r\n\nlast line without newline")
    os.close(write)
    assert _next_within(chunks) == ["thr\ufffdee", "", "last line without newline"]
    assert list(chunks) == []
    os.close(read)


def test_chunks_are_bounded():
    read, write = os.pipe()
    os.write(write, b"".join(b"%d\n" % i for i in range(25)))
    os.close(write)
    sizes = [len(chunk) for chunk in read_chunks(read, max_lines=10)]
    assert sizes == [10, 10, 5]
    os.close(read)
