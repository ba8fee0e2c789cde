"""ICGNN-style (reconstructed) precoding and power allocation: Sun, Wu, Wang, Li, Zhang, Liu, "A Homogeneous Graph
Neural Network for Precoding and Power Allocation in Scalable Wireless Networks", arXiv 2408.17252.

Not the intersecting-communities, input-convex or interference-channel models of the same name.
"""
