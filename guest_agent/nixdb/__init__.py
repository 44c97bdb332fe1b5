"""nixdb"""
