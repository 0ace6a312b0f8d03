"""The compact convolutional student (`CNNPolicy`): a registered family sized for CPU training."""
