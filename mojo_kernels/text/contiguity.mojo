# Input checks shared by the text ops: the kernels index raw pointers, so every tensor
# they read or write must be dense row-major (as varlen_attention and
# bilinear_pos_embed require of theirs).
from std.utils import IndexList


def require_contiguous[rank: Int](
    op: StaticString, name: StaticString, shape: IndexList[rank], strides: IndexList[rank]
) raises:
    """Raise unless `strides` are the dense row-major strides of `shape` (the stride of a
    dimension of size 1 does not matter)."""
    var dense = 1
    comptime for i in range(rank):
        comptime r = rank - 1 - i
        if shape[r] > 1 and strides[r] != dense:
            raise Error(String(op, ": ", name, " must be contiguous (dense row-major)"))
        dense *= shape[r]
