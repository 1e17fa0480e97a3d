"""gradprobe: where did my gradients go, and what is my autograd graph holding in memory?"""
