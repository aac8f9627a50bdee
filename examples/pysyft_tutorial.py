"""OpenMined's "MultiLayer Split Neural Network" tutorial (PySyft 0.2), run on splitnn.

The tutorial's code below (between the two marker comments) is verbatim; the
only change from the original notebook is ``import splitnn.syft as sy`` in
place of ``import syft as sy``, and a data loader that reads MNIST with splitnn
instead of torchvision. Run it from the repository root:

    OMP_NUM_THREADS=1 python examples/pysyft_tutorial.py --data-dir ../shared/data

Only MNIST's test set is available offline here, so by default the script trains
on its first 8,000 images and reports accuracy on the other 2,000; pass
``--split train`` on a machine that has (or can download) the training set.
Afterwards it prints splitnn's ledger: every byte each party sent.
"""

import argparse

import torch
from torch import nn, optim

import splitnn.syft as sy
from splitnn.data import load_dataset

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--data-dir", default=None, help="directory holding mnist/ (default: splitnn's search path)")
parser.add_argument("--split", default="test", choices=["train", "test"], help="MNIST split to read")
parser.add_argument("--limit", type=int, default=None, help="use only the first LIMIT images")
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--holdout", type=int, default=2000, help="last samples kept out of training for accuracy")
parser.add_argument("--batch-size", type=int, default=64)
args = parser.parse_args()

data = load_dataset("mnist", args.split, data_dir=args.data_dir, limit=args.limit)
n_train = len(data.labels) - args.holdout
order = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))
# Any iterable of (images, labels) batches with a len() will do: here a list, images (N, 1, 28, 28).
trainloader = [(data.features[idx], data.labels[idx]) for idx in torch.split(order, args.batch_size)]
epochs = args.epochs

# ---- the tutorial's code, verbatim -------------------------------------------------------
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
# ---- end of the tutorial's code ----------------------------------------------------------

print("\nTraining transfers (splitnn ledger):")
print(sy.ledger().format_table())

if args.holdout > 0:
    with torch.no_grad():
        images = data.features[n_train:].send(alice)
        prediction = splitNN.forward(images.view(images.shape[0], -1)).get().argmax(dim=1)
    accuracy = (prediction == data.labels[n_train:]).float().mean().item()
    print(f"\nAccuracy on the {args.holdout} held-out images: {accuracy:.4f}")
