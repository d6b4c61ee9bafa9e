"""Named axes ("dims") and coordinate labels, carried through numpy indexing and broadcasting.

Variable arrays and linear expressions of :mod:`lloptim.formulations.model` follow numpy's
positional semantics exactly. On top of that an axis may carry a *name* (``"request"``,
``"client"``) and, optionally, *coordinates* (one label per position, e.g. request ids). Names let
``x.sum("client")`` and ``x.sel(client=[3, 4])`` say what they mean, and catch a class of bugs:
combining two operands whose axes are named differently at the same position is an error, where
numpy would silently broadcast. Names never change what numpy would compute.

Where numpy's advanced indexing rearranges axes in ways that no longer map onto the original axes
(several array indices at once, multi-dimensional integer arrays), the result's axes are unnamed.
"""

from __future__ import annotations

import numbers

import numpy as np

from lloptim.errors import SpecError

__all__ = ["Dims", "Coords", "LabelledArray", "normalize_key", "index_axes", "broadcast_axes", "resolve_axes", "sel_key",
           "check_coords"]

#: Names of the axes of an array, ``None`` for an unnamed axis (one entry per axis).
Dims = tuple
#: Coordinates of named axes: axis name -> one label per position (a 1-D numpy array).
Coords = dict


class LabelledArray:
    """What variable and expression arrays share: named axes, coordinates, and numpy's shape.

    A subclass sets ``dims`` and ``coords`` through :meth:`_label` and names, in ``_shape_of``, the
    attribute whose array gives its shape (the variables' labels, the expressions' constants).
    """

    __slots__ = ()
    _shape_of = ""

    def _label(self, dims, coords, ndim: int) -> None:
        self.dims = tuple(dims) if dims is not None else (None,) * ndim
        self.coords = dict(coords or {})

    @property
    def shape(self) -> tuple:
        """Shape of the array."""
        return getattr(self, self._shape_of).shape

    @property
    def ndim(self) -> int:
        """Number of axes."""
        return getattr(self, self._shape_of).ndim

    @property
    def size(self) -> int:
        """Number of entries in the array (count)."""
        return int(getattr(self, self._shape_of).size)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError(f"len() of a scalar {type(self).__name__}")
        return self.shape[0]


def check_coords(shape: tuple | None, coords) -> tuple[tuple, tuple, dict]:
    """Axis names and coordinates from the ``coords`` argument of ``add_variables``.

    Parameters
    ----------
    shape : tuple
        The array's shape (count per axis), or ``None`` to take it from ``coords``.
    coords : dict or None
        Axis name -> labels (a sequence, one label per position) or an int (the axis length,
        no labels), one entry per axis, in axis order.

    Returns
    -------
    tuple
        ``(shape, dims, coords)``: the shape, the axis names and the coordinates as numpy arrays.

    Raises
    ------
    SpecError
        ``coords`` is not a mapping, has the wrong number of entries, or a length that
        disagrees with ``shape``.
    """
    if coords is None:
        return tuple(shape), (None,) * len(shape), {}
    if not isinstance(coords, dict):
        raise SpecError("coords", f"must be a dict of axis name -> labels, got {type(coords).__name__}",
                        "give e.g. coords={'request': ids, 'client': 40}")
    dims, out, sizes = [], {}, []
    for name, labels in coords.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise SpecError("coords", f"axis name {name!r} is not an identifier", "use names like 'client'")
        dims.append(name)
        if isinstance(labels, numbers.Integral):
            sizes.append(int(labels))
        else:
            arr = np.asarray(labels)
            if arr.ndim != 1:
                raise SpecError(f"coords.{name}", f"must be one-dimensional, got shape {arr.shape}",
                                "give one label per position")
            if np.unique(arr).size != arr.size:
                raise SpecError(f"coords.{name}", "has repeated labels", "give each position its own label")
            out[name] = arr
            sizes.append(arr.size)
    if shape is not None and tuple(shape) != tuple(sizes):
        raise SpecError("coords", f"gives axis lengths {tuple(sizes)} for shape {tuple(shape)}",
                        "make the coordinates match the shape, or leave shape out")
    return tuple(sizes), tuple(dims), out


def _consumes(item) -> int:
    """How many axes of the indexed array one index item uses up."""
    if item is None:
        return 0
    if isinstance(item, np.ndarray) and item.dtype == bool:
        return item.ndim
    return 1


def normalize_key(key, ndim: int) -> tuple:
    """``key`` as a tuple covering exactly ``ndim`` axes (Ellipsis expanded, trailing ``:`` added).

    Lists become numpy arrays, so that a trailing axis (the term axis of an expression) can be
    appended without changing numpy's interpretation.

    Parameters
    ----------
    key : object
        Anything numpy accepts as an index.
    ndim : int
        Number of axes of the indexed array (count).

    Returns
    -------
    tuple
        The normalized index.

    Raises
    ------
    SpecError
        More indices than axes, or more than one Ellipsis.
    """
    if not isinstance(key, tuple):
        key = (key,)
    key = tuple(np.asarray(k) if isinstance(k, (list, range)) else k for k in key)
    key = tuple(np.asarray(k) if isinstance(k, np.ndarray) or _is_array_like(k) else k for k in key)
    n_ell = sum(1 for k in key if k is Ellipsis)
    if n_ell > 1:
        raise SpecError("index", "has more than one '...'", "use at most one Ellipsis")
    used = sum(_consumes(k) for k in key if k is not Ellipsis)
    if used > ndim:
        raise SpecError("index", f"uses {used} axes of an array with {ndim}", "index at most as many axes as it has")
    fill = (slice(None),) * (ndim - used)
    if n_ell:
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        return key[:i] + fill + key[i + 1:]
    return key + fill


def _is_array_like(k) -> bool:
    return hasattr(k, "__array__") and not isinstance(k, (np.generic, numbers.Number))


def index_axes(dims: Dims, coords: Coords, key: tuple, out_ndim: int) -> tuple[Dims, Coords]:
    """Axis names and coordinates of ``a[key]`` for an array with ``dims`` (``key`` normalized).

    Parameters
    ----------
    dims : tuple
        Axis names of the indexed array (``None`` for unnamed axes).
    coords : dict
        Its coordinates, axis name -> labels.
    key : tuple
        A key from :func:`normalize_key`.
    out_ndim : int
        Number of axes numpy's result has (count).

    Returns
    -------
    tuple
        ``(dims, coords)`` of the result; all axes unnamed where numpy's advanced indexing does
        not map result axes onto source axes one to one.
    """
    advanced = [i for i, k in enumerate(key) if isinstance(k, np.ndarray)]
    generic = ((None,) * out_ndim, {})
    if len(advanced) > 1:
        return generic
    out_dims: list = []
    out_coords: dict = {}
    axis = 0
    for k in key:
        if k is None:
            out_dims.append(None)
            continue
        if isinstance(k, np.ndarray):
            if k.dtype == bool:
                if k.ndim == 1:
                    name = dims[axis]
                    out_dims.append(name)
                    if name in coords:
                        out_coords[name] = coords[name][k]
                else:
                    out_dims.append(None)
                axis += k.ndim
                continue
            if not np.issubdtype(k.dtype, np.integer):
                raise SpecError("index", f"array index of dtype {k.dtype} is not integer or boolean",
                                "index with integers, booleans or slices")
            name = dims[axis]
            if k.ndim == 1:
                out_dims.append(name)
                if name in coords:
                    out_coords[name] = coords[name][k]
            else:
                out_dims.extend([None] * k.ndim)
            axis += 1
            continue
        if isinstance(k, slice):
            name = dims[axis]
            out_dims.append(name)
            if name in coords:
                out_coords[name] = coords[name][k]
        axis += 1  # an integer drops the axis
    if len(out_dims) != out_ndim:
        return generic
    return tuple(out_dims), out_coords


def broadcast_axes(a_dims: Dims, a_coords: Coords, a_shape: tuple, b_dims: Dims, b_coords: Coords,
                   b_shape: tuple) -> tuple[tuple, Dims, Coords]:
    """Shape, axis names and coordinates of numpy's broadcast of two operands.

    Axes are aligned from the right, as numpy does. An axis named in both operands must carry the
    same name; a name (and its coordinates) is kept from whichever operand has it.

    Parameters
    ----------
    a_dims, b_dims : tuple
        Axis names of the operands (``None`` for unnamed axes).
    a_coords, b_coords : dict
        Their coordinates.
    a_shape, b_shape : tuple
        Their shapes.

    Returns
    -------
    tuple
        ``(shape, dims, coords)`` of the result.

    Raises
    ------
    SpecError
        The shapes do not broadcast, or two axes at the same position are named differently.
    """
    try:
        shape = np.broadcast_shapes(tuple(a_shape), tuple(b_shape))
    except ValueError:
        raise SpecError("shape", f"operands of shapes {tuple(a_shape)} and {tuple(b_shape)} do not broadcast",
                        "index or reshape them so numpy can broadcast them") from None
    n = len(shape)
    pa = (None,) * (n - len(a_dims)) + tuple(a_dims)
    pb = (None,) * (n - len(b_dims)) + tuple(b_dims)
    dims, coords = [], {}
    for i in range(n):
        na, nb = pa[i], pb[i]
        if na is not None and nb is not None and na != nb:
            raise SpecError("dims", f"axis {i - n} is named {na!r} in one operand and {nb!r} in the other",
                            "index, transpose or sum so the named axes line up")
        name = na if na is not None else nb
        dims.append(name)
        if name is not None:
            for c in (a_coords, b_coords):
                if name in c and c[name].size == shape[i]:
                    coords[name] = c[name]
                    break
    return shape, tuple(dims), coords


def resolve_axes(dims: Dims, axis) -> tuple[int, ...]:
    """Axis positions named by ``axis``: an int, an axis name, or a tuple of them (None: all).

    Parameters
    ----------
    dims : tuple
        Axis names of the array (its length is the number of axes).
    axis : int or str or tuple or None
        Axes to resolve; negative ints count from the end.

    Returns
    -------
    tuple of int
        Sorted, distinct, non-negative axis positions.

    Raises
    ------
    SpecError
        An unknown name or an axis out of range.
    """
    ndim = len(dims)
    if axis is None:
        return tuple(range(ndim))
    items = axis if isinstance(axis, (tuple, list)) else (axis,)
    out = []
    for a in items:
        if isinstance(a, str):
            if a not in dims:
                named = [d for d in dims if d is not None]
                raise SpecError("axis", f"no axis named {a!r}", f"use one of {named}" if named
                                else "this array has no named axes: give an axis number")
            out.append(dims.index(a))
        elif isinstance(a, numbers.Integral):
            if not -ndim <= a < ndim:
                raise SpecError("axis", f"axis {a} is out of range for {ndim} axes", f"use 0..{ndim - 1}")
            out.append(int(a) % ndim)
        else:
            raise SpecError("axis", f"must be an int or an axis name, got {a!r}", "give e.g. axis=0 or 'client'")
    return tuple(sorted(set(out)))


def sel_key(dims: Dims, coords: Coords, selection: dict) -> tuple:
    """The positional index selecting coordinate labels: ``{"client": [3, 4]}`` -> ``(:, [i3, i4])``.

    Parameters
    ----------
    dims : tuple
        Axis names of the array.
    coords : dict
        Its coordinates.
    selection : dict
        Axis name -> one label (drops the axis) or a sequence of labels (keeps it).

    Returns
    -------
    tuple
        An index for ``array[...]``.

    Raises
    ------
    SpecError
        An axis without coordinates or a label that is not among them.
    """
    key: list = [slice(None)] * len(dims)
    for name, want in selection.items():
        if name not in coords:
            raise SpecError(f"sel.{name}", "axis has no coordinates" if name in dims else "no such axis",
                            f"select on one of {sorted(coords)}" if coords else "give coords to add_variables")
        labels = coords[name]
        pos = {v.item() if hasattr(v, "item") else v: i for i, v in enumerate(labels)}
        scalar = np.ndim(want) == 0
        wanted = [want] if scalar else list(np.asarray(want).tolist())
        try:
            idx = [pos[w] for w in wanted]
        except KeyError as exc:
            raise SpecError(f"sel.{name}", f"label {exc.args[0]!r} is not a coordinate",
                            "select labels that add_variables was given") from None
        key[dims.index(name)] = idx[0] if scalar else np.asarray(idx, dtype=np.int64)
    return tuple(key)
