"""Running a tutorial's published cells on splitnn: exactly what is replaced, and nothing else.

Three things change, all outside the tutorials' own logic:

- the parameters cell ``epochs = 15`` runs with the epoch count the test asks for;
- the import cell loses ``from torchvision import datasets, transforms`` and
  imports ``splitnn.syft as sy`` in place of ``syft as sy``;
- the data cell (torchvision's MNIST with ``ToTensor()`` and
  ``Normalize((0.5,), (0.5,))`` in a ``DataLoader``) and, in Tutorial 2, the two
  lines that build ``testset``/``testloader`` the same way are left out: the
  test provides ``trainloader`` (and ``testloader``), loaders of the same MNIST
  tensors read by splitnn (:class:`tests.syft.helpers.Loader`).

Every other cell runs character for character as published.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from typing import Any

PARAMETERS = "epochs = 15"

IMPORTS = """\
import torch
from torchvision import datasets, transforms
from torch import nn, optim
import syft as sy
hook = sy.TorchHook(torch)"""

#: The import cell as a splitnn user runs it.
PORTED_IMPORTS = """\
import torch
from torch import nn, optim
import splitnn.syft as sy
hook = sy.TorchHook(torch)"""

DATA = """\
# Data preprocessing
transform = transforms.Compose([transforms.ToTensor(),
                              transforms.Normalize((0.5,), (0.5,)),
                              ])
trainset = datasets.MNIST('mnist', download=True, train=True, transform=transform)
trainloader = torch.utils.data.DataLoader(trainset, batch_size=64, shuffle=True)"""

#: Tutorial 2's last cell starts with these lines; its ``test(...)`` calls run as published.
TEST_DATA = """\
testset = datasets.MNIST('mnist', download=True, train=False, transform=transform)
testloader = torch.utils.data.DataLoader(testset, batch_size=64, shuffle=False)
"""


def port(cells: Sequence[str], epochs: int) -> list[str]:
    """The cells as run on splitnn (see the module docstring); raises if a replaced cell is not as published."""
    replaced = {PARAMETERS: f"epochs = {epochs}", IMPORTS: PORTED_IMPORTS, DATA: ""}
    for cell in replaced:
        assert cells.count(cell) == 1, f"the tutorial does not have exactly one cell {cell!r}"
    ported = [replaced.get(cell, cell) for cell in cells]
    test_data = [i for i, cell in enumerate(ported) if TEST_DATA in cell]
    assert len(test_data) <= 1 and all(ported[i].startswith(TEST_DATA) for i in test_data)
    return [cell.replace(TEST_DATA, "") for cell in ported]


def kept(cells: Sequence[str]) -> list[str]:
    """What runs as published: every cell but the parameters, import and data cells (Tutorial 2's last
    cell without its two data lines)."""
    return [cell.replace(TEST_DATA, "") for cell in cells if cell not in (PARAMETERS, IMPORTS, DATA)]


def run(
    cells: Sequence[str],
    *,
    epochs: int,
    trainloader: Any,
    testloader: Any = None,
    after_cell: Callable[[dict], None] | None = None,
) -> tuple[dict, list[str]]:
    """Exec the ported cells one by one in one namespace, as a notebook kernel would.

    ``after_cell(namespace)`` runs after each cell (to look at the state between
    cells). Returns the namespace and the lines the cells printed.
    """
    namespace: dict = {"__name__": "__main__", "trainloader": trainloader}
    if testloader is not None:
        namespace["testloader"] = testloader
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, cell in enumerate(port(cells, epochs)):
            exec(compile(cell, f"<cell {i}>", "exec"), namespace)
            if after_cell is not None:
                after_cell(namespace)
    return namespace, out.getvalue().splitlines()
