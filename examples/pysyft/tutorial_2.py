"""Tutorial 2 - MultiLayer Split Neural Network (OpenMined, PySyft 0.2), run on splitnn.

Between the marker comments are the notebook's code cells, in order, as published
(github.com/OpenMined/PySyft, branch syft_0.2.x,
examples/tutorials/advanced/split_neural_network/), each after a "# [cell N]"
comment. Three cells are changed, and say so: the parameters cell (`epochs = 15`)
takes --epochs, the import cell imports splitnn.syft in place of syft and leaves
out torchvision, and the torchvision data cell is replaced by loaders of the same
MNIST tensors read by splitnn (mnist_loaders.py). Run from the repository root:

    OMP_NUM_THREADS=1 python examples/pysyft/tutorial_2.py --data-dir ../shared/data

Only MNIST's test set is available offline here, so by default the script trains
on its first 8,000 images and tests on the other 2,000; --split train trains on
the training set and tests on the test set, as the notebook does. Afterwards it
prints splitnn's ledger (every byte each party sent).
"""

from mnist_loaders import loaders, options

args = options(__doc__)

# ---- the notebook's code cells ----------------------------------------------------------
# [cell 1: the parameters cell, which was `epochs = 15`; --epochs sets it]
epochs = args.epochs

# [cell 2: the imports, without torchvision, and splitnn.syft in place of syft]
import torch
from torch import nn, optim
import splitnn.syft as sy
hook = sy.TorchHook(torch)

# [cell 3]
class SplitNN(torch.nn.Module):
    def __init__(self, models, optimizers):
        self.models = models
        self.optimizers = optimizers
        self.outputs = [None]*len(self.models)
        self.inputs = [None]*len(self.models)
        super().__init__()
        
    def forward(self, x):
        self.inputs[0] = x
        self.outputs[0] = self.models[0](self.inputs[0])
        
        for i in range(1, len(self.models)):
            self.inputs[i] = self.outputs[i-1].detach().requires_grad_()
            if self.outputs[i-1].location != self.models[i].location:
                self.inputs[i] = self.inputs[i].move(self.models[i].location).requires_grad_()               
            self.outputs[i] = self.models[i](self.inputs[i])
        
        return self.outputs[-1]
    
    def backward(self):
        for i in range(len(self.models)-2, -1, -1):
            grad_in = self.inputs[i+1].grad.copy()
            if self.outputs[i].location != self.inputs[i+1].location:
                grad_in = grad_in.move(self.outputs[i].location)
            self.outputs[i].backward(grad_in)
    
    def zero_grads(self):
        for opt in self.optimizers:
            opt.zero_grad()
        
    def step(self):
        for opt in self.optimizers:
            opt.step()
    
    def train(self):
        for model in self.models:
            model.train()
    
    def eval(self):
        for model in self.models:
            model.eval()
            
    @property
    def location(self):
        return self.models[0].location if self.models and len(self.models) else None

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
claire = sy.VirtualWorker(hook, id="claire")

# Send Model Segments to model locations
model_locations = [alice, bob, claire]
for model, location in zip(models, model_locations):
    model.send(location)

#Instantiate a SpliNN class with our distributed segments and their respective optimizers
splitNN =  SplitNN(models, optimizers)

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
    splitNN.train()
    for images, labels in trainloader:
        images = images.send(models[0].location)
        images = images.view(images.shape[0], -1)
        labels = labels.send(models[-1].location)
        loss = train(images, labels, splitNN)
        running_loss += loss.get()

    else:
        print("Epoch {} - Training loss: {}".format(i, running_loss/len(trainloader)))

# [cell 8]
def test(model, dataloader, dataset_name):
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in dataloader:
            data = data.view(data.shape[0], -1).send(model.location)
            output = model(data).get()
            pred = output.data.max(1, keepdim=True)[1]
            correct += pred.eq(target.data.view_as(pred)).sum()

    print("{}: Accuracy {}/{} ({:.0f}%)".format(dataset_name, 
                                                correct,
                                                len(dataloader.dataset), 
                                                100. * correct / len(dataloader.dataset)))

# [cell 9: as published, but for its first two lines (torchvision's test set): testloader is above]
test(splitNN, testloader, "Test set")
test(splitNN, trainloader, "Train set")
# ---- end of the notebook's code cells ----------------------------------------------------

print()
print(sy.ledger().format_table())
