"""Use attnopt's attention without torch.compile, through libraries' own extension points."""
