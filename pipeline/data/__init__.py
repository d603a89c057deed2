"""Stage two's data: stores read and joined into rows, and the cross-validation folds."""
