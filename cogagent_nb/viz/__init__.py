"""Pictures for people: dataset samples with their boxes (`plots`), the loss mask in colour
(`loss_mask`). Each function returns a figure, HTML or a widget; none of them changes data."""
