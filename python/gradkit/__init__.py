"""gradkit"""
