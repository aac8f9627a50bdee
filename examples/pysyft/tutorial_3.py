"""Tutorial 3 - Folded Split Neural Network (OpenMined, PySyft 0.2), run on splitnn.

Between the marker comments are the notebook's code cells, in order, as published
(github.com/OpenMined/PySyft, branch syft_0.2.x,
examples/tutorials/advanced/split_neural_network/), each after a "# [cell N]"
comment. Three cells are changed, and say so: the parameters cell (`epochs = 15`)
takes --epochs, the import cell imports splitnn.syft in place of syft and leaves
out torchvision, and the torchvision data cell is replaced by loaders of the same
MNIST tensors read by splitnn (mnist_loaders.py). Run from the repository root:

    OMP_NUM_THREADS=1 python examples/pysyft/tutorial_3.py --data-dir ../shared/data

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

# [cell 2]
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

        i=1    
        while i < (len(models)-1):
            
            a.append(models[i](remote_a[-1]))
            if a[-1].location == models[i+1].location:
                remote_a.append(a[-1].detach().requires_grad_())
            else:
                remote_a.append(a[-1].detach().move(models[i+1].location).requires_grad_())
            
            i+=1
        
        a.append(models[i](remote_a[-1]))
        self.a = a
        self.remote_a = remote_a
        
        return a[-1]
    
    def backward(self):
        a=self.a
        remote_a=self.remote_a
        optimizers = self.optimizers
        
        i= len(models)-2   
        while i > -1:
            if remote_a[i].location == a[i].location:
                grad_a = remote_a[i].grad.copy()
            else:
                grad_a = remote_a[i].grad.copy().move(a[i].location)
            a[i].backward(grad_a)
            i-=1

    
    def zero_grads(self):
        for opt in optimizers:
            opt.zero_grad()
        
    def step(self):
        for opt in optimizers:
            opt.step()

# [cell 3: the imports, without torchvision, and splitnn.syft in place of syft]
import torch
from torch import nn, optim
import splitnn.syft as sy
hook = sy.TorchHook(torch)

# [cell 4: the data cell; torchvision's MNIST replaced by the same tensors, read by splitnn]
trainloader, testloader = loaders(args)

# [cell 5]
torch.manual_seed(0)

# Define our model segments

input_size = 784
hidden_sizes = [128, 640]
output_size = 10

models = [
    nn.Sequential(
                nn.Linear(input_size, hidden_sizes[0]),
                nn.ReLU(),
    ),
    nn.Sequential(
                nn.Linear(hidden_sizes[0], hidden_sizes[1]),
                nn.ReLU(),
    ),
    nn.Sequential(
                nn.Linear(hidden_sizes[1], output_size),
                nn.LogSoftmax(dim=1)
    )
]

# Create optimisers for each segment and link to them
optimizers = [
    optim.SGD(model.parameters(), lr=0.03,)
    for model in models
]

# create some workers
alice = sy.VirtualWorker(hook, id="alice")
bob = sy.VirtualWorker(hook, id="bob")

# Send Model Segments to model locations
model_locations = [alice, bob, alice]
for model, location in zip(models, model_locations):
    model.send(location)

#Instantiate a SpliNN class with our distributed segments and their respective optimizers
splitNN = SplitNN(models, optimizers)

# [cell 6]
def train(x, target, splitNN):
    
    #1) Zero our grads
    splitNN.zero_grads()
    
    #2) Make a prediction
    pred = splitNN.forward(x)
    
    #3) Figure out how much we missed by
    criterion = nn.NLLLoss()
    loss = criterion(pred, target)
    
    #4) Backprop the loss on the end layer
    loss.backward()
    
    #5) Feed Gradients backward through the nework
    splitNN.backward()
    
    #6) Change the weights
    splitNN.step()
    
    return loss

# [cell 7]
for i in range(epochs):
    running_loss = 0
    for images, labels in trainloader:
        images = images.send(models[0].location)
        images = images.view(images.shape[0], -1)
        labels = labels.send(models[-1].location)
        loss = train(images, labels, splitNN)
        running_loss += loss.get()

    else:
        print("Epoch {} - Training loss: {}".format(i, running_loss/len(trainloader)))
# ---- end of the notebook's code cells ----------------------------------------------------

print()
print(sy.ledger().format_table())



def predict(images):
    """The tutorial's SplitNN.forward on a batch at alice; the prediction comes home."""
    return splitNN.forward(images.send(models[0].location).view(images.shape[0], -1)).get()


print()
print(accuracy(predict, testloader))
