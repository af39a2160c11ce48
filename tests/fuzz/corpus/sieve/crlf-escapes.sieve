require "fileinto";
if header :is "Subject" "\"quoted\\" {fileinto "A";}
