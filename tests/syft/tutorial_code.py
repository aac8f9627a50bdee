"""The code of OpenMined's "MultiLayer Split Neural Network" tutorial (PySyft 0.2), as quoted in issue 5.

``TUTORIAL`` is the tutorial's code verbatim; it expects ``torch``, ``nn``, ``optim``,
``sy``, ``epochs`` and ``trainloader`` to be defined. ``IMPORTS`` is the tutorial's
import cell with the one change a user makes: ``import splitnn.syft as sy`` in place
of ``import syft as sy`` (torchvision, used only for its data loader, is not needed).
"""

IMPORTS = """\
import torch
from torch import nn, optim
import splitnn.syft as sy
"""

TUTORIAL = '''\
class SplitNN:
    def __init__(self, models, optimizers):
        self.models = models
        self.optimizers = optimizers
    def forward(self, x):
        a = []
        remote_a = []
        a.append(models[0](x))
        if a[-1].location == models[1].location:
            remote_a.append(a[-1].detach().requires_grad_())
        else:
            remote_a.append(a[-1].detach().move(models[1].location).requires_grad_())
        i = 1
        while i < (len(models) - 1):
            a.append(models[i](remote_a[-1]))
            if a[-1].location == models[i + 1].location:
                remote_a.append(a[-1].detach().requires_grad_())
            else:
                remote_a.append(a[-1].detach().move(models[i + 1].location).requires_grad_())
            i += 1
        a.append(models[i](remote_a[-1]))
        self.a = a
        self.remote_a = remote_a
        return a[-1]
    def backward(self):
        a = self.a
        remote_a = self.remote_a
        optimizers = self.optimizers
        i = len(models) - 2
        while i > -1:
            if remote_a[i].location == a[i].location:
                grad_a = remote_a[i].grad.copy()
            else:
                grad_a = remote_a[i].grad.copy().move(a[i].location)
            a[i].backward(grad_a)
            i -= 1
    def zero_grads(self):
        for opt in optimizers:
            opt.zero_grad()
    def step(self):
        for opt in optimizers:
            opt.step()

hook = sy.TorchHook(torch)
torch.manual_seed(0)
models = [nn.Sequential(nn.Linear(784, 128), nn.ReLU()),
          nn.Sequential(nn.Linear(128, 640), nn.ReLU()),
          nn.Sequential(nn.Linear(640, 10), nn.LogSoftmax(dim=1))]
optimizers = [optim.SGD(model.parameters(), lr=0.03) for model in models]
alice = sy.VirtualWorker(hook, id="alice")
bob = sy.VirtualWorker(hook, id="bob")
claire = sy.VirtualWorker(hook, id="claire")
for model, location in zip(models, [alice, bob, claire]):
    model.send(location)
splitNN = SplitNN(models, optimizers)

def train(x, target, splitNN):
    splitNN.zero_grads()
    pred = splitNN.forward(x)
    loss = nn.NLLLoss()(pred, target)
    loss.backward()
    splitNN.backward()
    splitNN.step()
    return loss

for i in range(epochs):
    running_loss = 0
    for images, labels in trainloader:
        images = images.send(models[0].location)
        images = images.view(images.shape[0], -1)
        labels = labels.send(models[-1].location)
        loss = train(images, labels, splitNN)
        running_loss += loss.get()
    else:
        print("Epoch {} - Training loss: {}".format(i, running_loss / len(trainloader)))
'''

#: The tutorial's model definition and placement, which the variants replace.
MODELS = """\
models = [nn.Sequential(nn.Linear(784, 128), nn.ReLU()),
          nn.Sequential(nn.Linear(128, 640), nn.ReLU()),
          nn.Sequential(nn.Linear(640, 10), nn.LogSoftmax(dim=1))]
"""
PLACEMENT = "zip(models, [alice, bob, claire])"


def variant(models: str, placement: str) -> str:
    """The tutorial with other segments (``models``) and places (``placement``), nothing else changed."""
    assert TUTORIAL.count(MODELS) == 1 and TUTORIAL.count(PLACEMENT) == 1
    return TUTORIAL.replace(MODELS, models).replace(PLACEMENT, placement)
