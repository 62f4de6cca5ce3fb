"""What a training item says about the images it skipped: a count, as it always was, that also names the files.

A PairDataset item stands in the next decodable row for an image that fails to decode, and its fourth element
counts the failures met on the way. The same bad file is met once per caption row that reaches it (5 captions:
up to 15 failures for one file), so the epoch's warning needs the files as well as the count; `Skips` carries
both through the loader workers and PairCollate, while code that reads the count as an int is unchanged.
"""


class Skips(int):
    """The number of decoding failures an item met; `files` names the file of each."""

    def __new__(cls, files=()):
        count = super().__new__(cls, len(files))
        count.files = tuple(files)
        return count

    def __reduce__(self):  # loader workers pickle their items
        return Skips, (self.files,)
