"""kmod"""
