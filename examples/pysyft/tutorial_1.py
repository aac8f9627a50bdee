"""Tutorial 1 - SplitNN Introduction (OpenMined, PySyft 0.2), run on splitnn.

Between the marker comments are the notebook's code cells, in order, as published
(github.com/OpenMined/PySyft, branch syft_0.2.x,
examples/tutorials/advanced/split_neural_network/), each after a "# [cell N]"
comment. Three cells are changed, and say so: the parameters cell (`epochs = 15`)
takes --epochs, the import cell imports splitnn.syft in place of syft and leaves
out torchvision, and the torchvision data cell is replaced by loaders of the same
MNIST tensors read by splitnn (mnist_loaders.py). Run from the repository root:

    OMP_NUM_THREADS=1 python examples/pysyft/tutorial_1.py --data-dir ../shared/data

Only MNIST's test set is available offline here, so by default the script trains
on its first 8,000 images and tests on the other 2,000; --split train trains on
the training set and tests on the test set, as the notebook does. Afterwards it
prints splitnn's ledger (every byte each party sent) and the test accuracy.
"""

from mnist_loaders import accuracy, loaders, options

args = options(__doc__)

# ---- the notebook's code cells ----------------------------------------------------------
# [cell 1: the parameters cell, which was `epochs = 15`; --epochs sets it]
epochs = args.epochs

# [cell 2: the imports, without torchvision, and splitnn.syft in place of syft]
import torch
from torch import nn, optim
import splitnn.syft as sy
hook = sy.TorchHook(torch)

# [cell 3: the data cell; torchvision's MNIST replaced by the same tensors, read by splitnn]
trainloader, testloader = loaders(args)

# [cell 4]
torch.manual_seed(0)

# Define our model segments

input_size = 784
hidden_sizes = [128, 640]
output_size = 10

models = [
    nn.Sequential(
                nn.Linear(input_size, hidden_sizes[0]),
                nn.ReLU(),
                nn.Linear(hidden_sizes[0], hidden_sizes[1]),
                nn.ReLU(),
    ),
    nn.Sequential(
                nn.Linear(hidden_sizes[1], output_size),
                nn.LogSoftmax(dim=1)
    )
]

# Create optimisers for each segment and link to their segment
optimizers = [
    optim.SGD(model.parameters(), lr=0.03,)
    for model in models
]

# create some workers
alice = sy.VirtualWorker(hook, id="alice")
bob = sy.VirtualWorker(hook, id="bob")
workers = alice, bob

# Send Model Segments to starting locations
model_locations = [alice, bob]

for model, location in zip(models, model_locations):
    model.send(location)

# [cell 5]
def train(x, target, models, optimizers):
    # Training Logic

    #1) erase previous gradients (if they exist)
    for opt in optimizers:
        opt.zero_grad()

    #2) make a prediction
    a = models[0](x)

    #3) break the computation graph link, and send the activation signal to the next model
    remote_a = a.move(models[1].location, requires_grad=True)

    #4) make prediction on next model using recieved signal
    pred = models[1](remote_a)

    #5) calculate how much we missed
    criterion = nn.NLLLoss()
    loss = criterion(pred, target)

    #6) figure out which weights caused us to miss
    loss.backward()

    # 7) send gradient of the recieved activation signal to the model behind
    # grad_a = remote_a.grad.copy().move(models[0].location)

    # 8) backpropagate on bottom model given this gradient
    # a.backward(grad_a)

    #9) change the weights
    for opt in optimizers:
        opt.step()

    #10) print our progress
    return loss.detach().get()

# [cell 6]
for i in range(epochs):
    running_loss = 0
    for images, labels in trainloader:
        images = images.send(alice)
        images = images.view(images.shape[0], -1)
        labels = labels.send(bob)
        
        loss = train(images, labels, models, optimizers)
        running_loss += loss

    else:
        print("Epoch {} - Training loss: {}".format(i, running_loss/len(trainloader)))
# ---- end of the notebook's code cells ----------------------------------------------------

print()
print(sy.ledger().format_table())



def predict(images):
    """The trained segments on a batch: alice's, then bob's; the prediction comes home."""
    a = models[0](images.send(alice).view(images.shape[0], -1))
    return models[1](a.move(bob)).get()


print()
print(accuracy(predict, testloader))
