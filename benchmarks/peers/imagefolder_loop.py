"""The plain torchvision way to train from a photo folder: ImageFolder + DataLoader workers + ResNet-18.

The peer of fmtl's data path in ``benchmarks/data_scale.py``: every batch is decoded from the JPEG files
by the workers, so its memory does not grow with the folder (nothing is kept) and every epoch pays the
decoding again. No fmtl imports. Prints one line: ``steps=.. images=.. seconds=.. images_per_s=..``.

    python benchmarks/peers/imagefolder_loop.py DIR --steps 21 --image-size 32 --workers 2
"""

import argparse
import time

import torch
import torchvision
from torchvision import transforms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    tf = transforms.Compose([
        transforms.Resize((args.image_size, args.image_size)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])  # fmt: skip
    data = torchvision.datasets.ImageFolder(args.folder, transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         persistent_workers=args.workers > 0)  # fmt: skip
    model = torchvision.models.resnet18(num_classes=len(data.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    seen, started = 0, None
    for step, (x, y) in enumerate(loader, 1):
        if step == 2:  # the first step pays the workers' start-up
            seen, started = 0, time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
        if step >= args.steps:
            break
    seconds = time.perf_counter() - started
    print(f"steps={args.steps} images={seen} seconds={seconds:.2f} images_per_s={seen / seconds:.1f}")


if __name__ == "__main__":
    main()
