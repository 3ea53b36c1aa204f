"""One pass over the data, columnar: the input's row groups, decoded to one tensor per
batch, through the same batch functions the MDF operators call."""
